"""plot_log.py: the lecture notebook's plot of a stage-7 log.txt, as a script for a headless server.

Panel 1: train loss (raw, faint, and a moving average) and val loss on a log axis, with the val
loss of OpenAI's GPT-2 124M checkpoint dashed. Panel 2: HellaSwag acc_norm with GPT-2's and
GPT-3's at the same size dashed (only when the log has HellaSwag lines). The x axis counts
optimisation steps; a second axis on top counts tokens when the log records the batch size.
The size for the baselines comes from the log's `# model:` header line, or --size.

    python plot_log.py                              # log/log.txt -> log/log.png
    python plot_log.py runs/350M/log.txt -o 350M.png --size 350M
    python plot_log.py log8/log.txt --compare log/log.txt   # stage 8's run and stage 7's, one plot

A step written twice (a run resumed from a checkpoint older than its last logged step) counts
once: the later line wins, as the resumed run's values are the ones the checkpoints continue.
"""
import argparse
import math
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# the lecture's baselines (its notebook, build-nanogpt play.ipynb): the val loss of OpenAI's GPT-2
# 124M checkpoint on our FineWeb-Edu val split (given for 124M only), and HellaSwag acc_norm of
# GPT-2 (the notebook's figures; hellaswag.py gets 0.2955 for 124M) and GPT-3 (its paper's
# zero-shot figures, for its 125M, 350M, 760M and 1.3B models, the sizes nearest GPT-2's)
GPT2_VAL_LOSS = {"124M": 3.2924}
GPT2_HELLA = {"124M": 0.2945, "350M": 0.3752, "774M": 0.4320, "1558M": 0.4889}
GPT3_HELLA = {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
GPT3_NAME = {"124M": "125M", "350M": "350M", "774M": "760M", "1558M": "1.3B"}
# keyed by (n_layer, n_embd)
GPT2_SIZE = {(12, 768): "124M", (24, 1024): "350M", (36, 1280): "774M", (48, 1600): "1558M"}
# written by 7_train_ddp_fineweb.py's log_header
MODEL_LINE = re.compile(r"^# model: n_layer (\d+) n_head \d+ n_embd (\d+) "
                        r".*\| total batch size (\d+) tokens")
KINDS = ("train", "val", "hella")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file


class LogError(ValueError):
    """A log with nothing to plot; the message says which and why, in one line."""


def read_log(path):
    """(streams, model, skipped): streams {"train"|"val"|"hella": {step: value}}, a later line for
    a step replacing an earlier one; model (n_layer, n_embd, total_batch_size) from the last
    `# model:` header line (a resumed run writes its own), or None; skipped counts the lines that
    do not parse, and a last line without its newline: cut off by a crash, or still being written
    ("12 train 1.0" of "12 train 1.0345" would parse, as a wrong value)."""
    streams, model, skipped = {kind: {} for kind in KINDS}, None, 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):  # the last line, cut off
                    skipped += bool(line.strip())
                    continue
                if line.startswith("#"):
                    if m := MODEL_LINE.match(line):
                        model = tuple(int(g) for g in m.groups())
                    continue
                fields = line.split()
                try:
                    step, kind, value = int(fields[0]), fields[1], float(fields[2])
                    assert kind in KINDS and len(fields) == 3
                except (IndexError, ValueError, AssertionError):
                    skipped += bool(fields)  # blank lines are not worth a mention
                    continue
                streams[kind][step] = value  # dicts keep the first insertion's place, last value
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"could not read {path} ({type(e).__name__}: {e})") from None
    if not any(streams.values()):
        raise LogError(f"{path} has no `STEP train|val|hella VALUE` lines to plot")
    return streams, model, skipped


def output_problem(log, out):
    """Why writing the PNG to `out` would destroy something, in one line, or None: the log itself
    (`-o LOG`, a log named *.png, a link to it), a folder, or a file that is not a PNG."""
    if os.path.realpath(out) == os.path.realpath(log) or (
            os.path.exists(out) and os.path.exists(log) and os.path.samefile(out, log)):
        return f"{out} is the log itself: the PNG would replace it; pass -o OTHER.png"
    if os.path.isdir(out):
        return f"{out} is a folder; pass -o FILE.png"
    if os.path.exists(out):
        try:
            with open(out, "rb") as f:
                if f.read(len(PNG_MAGIC)) == PNG_MAGIC:
                    return None  # an earlier plot: replaced
        except OSError as e:
            return f"could not read {out} ({e.strerror}); pass -o another file"
        return (f"{out} exists and is not a PNG, so not a plot to replace; "
                "pass -o another file, or move it away")
    return None


def script_of(path):
    """The script a log's `# command:` line names (7_train_ddp_fineweb.py, ...), else "run"."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("# command:"):
                    script = next((w for w in line.split() if w.endswith(".py")), "run")
                    return os.path.basename(script)
    except OSError:
        pass
    return "run"


def series(stream):
    """(steps, values) in step order."""
    steps = sorted(stream)
    return steps, [stream[s] for s in steps]


def moving_average(values, window):
    """Mean of each value and the window-1 before it (fewer at the start)."""
    import numpy as np
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def make_figure(streams, size=None, tokens_per_step=None, smooth=None, ymax=None, title="",
                others=()):
    """The figure and its panels (the loss panel if there are losses, then the HellaSwag panel if
    there are HellaSwag lines). size: "124M" | "350M" | "774M" | "1558M" | None (no baselines).
    ymax: the top of the loss axis; by default 4.0 once the losses go below 3.6 (the lecture's
    view of a finished run: the first few hundred steps' losses, 11 -> 4, would squash the rest).
    others: [(label, streams)] of other logs, drawn beside this one (--compare), labelled."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed: renders straight to a PNG
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, MultipleLocator, NullFormatter, ScalarFormatter

    kinds = [k for k in (("train", "val"), ("hella",)) if any(streams[x] for x in k)]
    fig, panels = plt.subplots(1, len(kinds), figsize=(8 * len(kinds), 6), squeeze=False)
    panels = list(panels[0])
    fig.suptitle(title)
    for ax, kind in zip(panels, kinds):
        if kind == ("train", "val"):
            if streams["train"]:
                steps, values = series(streams["train"])
                window = smooth or max(1, len(values) // 100)
                if window == 1:  # nothing to smooth: the raw curve, drawn plainly
                    ax.plot(steps, values, color="C0", linewidth=1.5, label="train loss")
                else:
                    ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8,
                            label="train loss")
                    ax.plot(steps, moving_average(values, window), color="C0", linewidth=1.5,
                            label=f"train loss, mean of {window} steps")
            if streams["val"]:
                ax.plot(*series(streams["val"]), color="C1",
                        marker="." if len(streams["val"]) < 50 else None,
                        linewidth=1.5, label="val loss")
            for i, (label, other) in enumerate(others):  # averaged train loss, val loss: own colour
                for k, kind_name in (("train", "train loss, mean"), ("val", "val loss")):
                    if other[k]:
                        steps, values = series(other[k])
                        if k == "train":
                            values = moving_average(values, smooth or max(1, len(values) // 100))
                        ax.plot(steps, values, color=f"C{3 + i}", linewidth=1.5, label=f"{label}: "
                                f"{kind_name}", linestyle="--" if k == "train" else "-")
            if size in GPT2_VAL_LOSS:
                ax.axhline(GPT2_VAL_LOSS[size], color="r", linestyle="--",
                           label=f"OpenAI GPT-2 ({size}) checkpoint val loss {GPT2_VAL_LOSS[size]}")
            ax.set_yscale("log")
            lowest = min(min(streams[k].values(), default=float("inf")) for k in kind)
            ymax = ymax or (4.0 if lowest < 3.6 else None)
            if ymax:
                ax.set_ylim(top=ymax)
            # ticks in plain numbers, not 10^x: every 0.2 below 4, else 1, 2, 3, 4, 5, 6, 8, 10, ...
            ax.yaxis.set_major_locator(MultipleLocator(0.2) if ymax and ymax <= 4.0 else
                                       LogLocator(subs=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("loss")
            ax.set_title("Loss")
        else:
            ax.plot(*series(streams["hella"]), color="C2",
                    marker="." if len(streams["hella"]) < 50 else None,
                    label="ours, acc_norm")
            for i, (label, other) in enumerate(others):
                if other["hella"]:
                    ax.plot(*series(other["hella"]), color=f"C{3 + i}", label=f"{label}: acc_norm")
            if size in GPT2_HELLA:
                ax.axhline(GPT2_HELLA[size], color="r", linestyle="--",
                           label=f"OpenAI GPT-2 ({size}) checkpoint {GPT2_HELLA[size]}")
                ax.axhline(GPT3_HELLA[size], color="g", linestyle="--",
                           label=f"OpenAI GPT-3 ({GPT3_NAME[size]}) {GPT3_HELLA[size]}")
            ax.set_ylabel("accuracy")
            ax.set_title("HellaSwag")
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
        if tokens_per_step:
            last = max(max(s, default=0) for s in streams.values())
            scale, unit = next((s, u) for s, u in ((1e9, "billions"), (1e6, "millions"),
                                                   (1e3, "thousands"), (1, ""))
                               if last * tokens_per_step >= s or s == 1)
            top = ax.secondary_xaxis("top", functions=(lambda x: x * tokens_per_step / scale,
                                                       lambda t: t * scale / tokens_per_step))
            top.set_xlabel(f"tokens seen ({unit})" if unit else "tokens seen")
    fig.tight_layout()
    return fig, panels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("log", nargs="?", default=os.path.join(HERE, "log", "log.txt"),
                        help="a log.txt of 7_train_ddp_fineweb.py "
                             "(default: log/log.txt beside this script)")
    parser.add_argument("-o", "--out", default=None,
                        help="the PNG to write (default: beside the log, .png)")
    parser.add_argument("--size", default=None, choices=[*GPT2_HELLA, "none"],
                        help="the GPT-2 size whose baselines to draw "
                             "(default: from the log's header)")
    parser.add_argument("--ymax", type=float, default=None,
                        help="top of the loss axis "
                             "(default: 4.0 once the losses go below 3.6, else all)")
    parser.add_argument("--compare", action="append", default=[], metavar="LOG",
                        help="another log.txt (stage 7's beside stage 8's), on the same plot")
    parser.add_argument("--smooth", type=int, default=None,
                        help="moving-average window of the train loss in steps "
                             "(default: 1%% of them)")
    args = parser.parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        sys.exit(f"error: --smooth {args.smooth}: the window is at least 1 step")
    if args.ymax is not None and not 0 < args.ymax < math.inf:  # nan too
        sys.exit(f"error: --ymax {args.ymax}: the loss axis is logarithmic; pass a positive number")
    out = args.out or os.path.splitext(args.log)[0] + ".png"
    problem = output_problem(args.log, out)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        streams, model, skipped = read_log(args.log)
    except LogError as e:
        sys.exit(f"error: {e}")

    if args.size:
        size = None if args.size == "none" else args.size
    elif model:
        size = GPT2_SIZE.get(model[:2])
        if size is None:
            print(f"n_layer {model[0]} n_embd {model[1]} is none of GPT-2's sizes: "
                  "no baselines (see --size)")
    else:
        size = "124M"  # a log without a `# model:` line: the lecture's run
        print("the log does not record the model size: baselines for 124M (see --size)")
    tokens_per_step = model[2] if model else None
    if skipped:
        print(f"skipped {skipped} line(s) that are not whole `STEP train|val|hella VALUE` lines")
    for kind, name, pick in (("train", "train loss", min), ("val", "val loss", min),
                             ("hella", "HellaSwag acc_norm", max)):
        if streams[kind]:
            step = pick(streams[kind], key=streams[kind].get)
            print(f"{'min' if pick is min else 'max'} {name} {streams[kind][step]:.4f} "
                  f"at step {step}")

    others = []
    for path in args.compare:  # each labelled by the script that wrote it (its `# command:` line)
        try:
            others.append((f"{script_of(path)} ({path})", read_log(path)[0]))
        except LogError as e:
            sys.exit(f"error: --compare: {e}")
    title = f"{script_of(args.log)} ({args.log})" if others else args.log
    fig, _ = make_figure(streams, size, tokens_per_step, args.smooth, args.ymax, title=title,
                         others=others)
    tmp = None
    try:  # a new temporary name: `OUT.tmp` could be an existing file, even the log
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(out)))
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a plot is for sharing
        os.replace(tmp, out)  # a reader (an image viewer refreshing) never sees half a PNG
    except OSError as e:
        sys.exit(f"error: could not write {out} ({e})")
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
