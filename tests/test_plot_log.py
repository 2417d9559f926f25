"""plot_log.py: stage 7's log.txt -> a PNG of the losses and HellaSwag, with the lecture's baselines."""
import os
import re
import struct

import pytest
from conftest import assert_clean_error, main_error, run_here

import plot_log


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def entries(log):
    """{kind: {step: value}} parsed here, independently of plot_log (the last line of a step wins)."""
    out = {"train": {}, "val": {}, "hella": {}}
    for line in log.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            step, kind, value = line.split()
            out[kind][int(step)] = float(value)
    return out


def dashed(ax):
    """The y values of the panel's dashed horizontal lines."""
    return sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_plot_of_a_real_stage7_log(stage7_run, tmp_path):
    log = tmp_path / "log.txt"
    log.write_text((stage7_run / "log.txt").read_text())
    proc = run_here("plot_log", log)  # default output: beside the log
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "log.png") == (1600, 600)  # two panels
    e = entries(log)
    assert sorted(e["train"]) == [0, 1, 2, 3] and sorted(e["val"]) == sorted(e["hella"]) == [0, 2, 3]
    for kind, name, pick in (("train", "train loss", min), ("val", "val loss", min),
                             ("hella", "HellaSwag acc_norm", max)):
        step = pick(e[kind], key=e[kind].get)
        assert f"{'min' if pick is min else 'max'} {name} {e[kind][step]:.4f} at step {step}" in proc.stdout
    # the header records the model and the batch: 2 layers of 32 dims is no GPT-2 size, so no baselines
    streams, model, skipped = plot_log.read_log(log)
    assert model == (2, 32, 256) and skipped == 0 and streams == e
    assert "none of GPT-2's sizes: no baselines" in proc.stdout

    fig, panels = plot_log.make_figure(streams, "124M", tokens_per_step=256)  # as with --size 124M
    assert [dashed(ax) for ax in panels] == [[3.2924], [0.2945, 0.337]]
    fig.canvas.draw()
    for ax in panels:  # the top axis counts tokens: 256 per step
        (top,) = ax.child_axes
        assert top.get_xlabel() == "tokens seen"
        assert top.get_xlim() == pytest.approx([x * 256 for x in ax.get_xlim()])


def test_resumed_log_without_hellaswag(tmp_path):
    """Steps 3 and 4 written twice (the run resumed from its step-3 checkpoint): the later lines
    win; no HellaSwag lines: one panel; a 124M header: GPT-2's val loss drawn; a cut-off last line
    is skipped."""
    header = ("# command: python 7_train_ddp_fineweb.py\n# model: n_layer 12 n_head 12 n_embd 768 (124.5M params)"
              " | total batch size 524288 tokens | B 64 T 1024\n")
    first = {0: 10.9, 1: 9.5, 2: 8.0, 3: 7.2, 4: 1.0}  # step 4's 1.0 was overwritten by the resumed run
    resumed = {3: 7.1, 4: 6.5, 5: 6.0}
    log = tmp_path / "log.txt"
    log.write_text(header + "0 val 11.0000\n" + "".join(f"{s} train {v:.6f}\n" for s, v in first.items())
                   + "3 val 7.5000\n" + header + "# resumed at step 3\n" + "3 val 7.4000\n"
                   + "".join(f"{s} train {v:.6f}\n" for s, v in resumed.items()) + "6 tra")
    streams, model, skipped = plot_log.read_log(log)
    assert streams["train"] == {**first, **resumed} and streams["val"] == {0: 11.0, 3: 7.4}
    assert streams["hella"] == {} and model == (12, 768, 524288) and skipped == 1

    out = tmp_path / "plot.png"
    proc = run_here("plot_log", log, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "min train loss 6.0000 at step 5" in proc.stdout and "min val loss 7.4000 at step 3" in proc.stdout
    assert "HellaSwag" not in proc.stdout and "skipped 1 line" in proc.stdout
    assert png_size(out) == (800, 600)  # one panel
    fig, panels = plot_log.make_figure(streams, "124M", tokens_per_step=524288)
    assert len(panels) == 1 and dashed(panels[0]) == [3.2924]
    raw = panels[0].get_lines()[0]  # the faint raw train loss
    assert list(raw.get_xdata()) == [0, 1, 2, 3, 4, 5] and list(raw.get_ydata()) == [10.9, 9.5, 8.0, 7.1, 6.5, 6.0]
    assert panels[0].child_axes[0].get_xlabel() == "tokens seen (millions)"


def test_moving_average():
    assert plot_log.moving_average([1, 2, 3, 4, 5], 2).tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert plot_log.moving_average([4, 2, 6], 5).tolist() == [4.0, 3.0, 4.0]  # fewer at the start


@pytest.mark.parametrize("content", [None, "", "# command: python 7_train_ddp_fineweb.py\n# resumed at step 3\n"],
                         ids=["missing", "empty", "header-only"])
def test_nothing_to_plot_is_one_line(content, tmp_path):
    log = tmp_path / "log.txt"
    if content is not None:
        log.write_text(content)
    proc = run_here("plot_log", log)
    assert_clean_error(proc, str(log))
    assert not (tmp_path / "log.png").exists()
    assert re.fullmatch(r"error: .*\n", proc.stderr)  # one line


LOG = "# command: python 7_train_ddp_fineweb.py\n0 train 10.900000\n0 val 11.0000\n1 train 9.500000\n"


@pytest.mark.parametrize("case", ["-o log", "log.png", "symlink", "hardlink", "not a png", "folder", "ymax"])
def test_no_output_replaces_an_input(case, tmp_path):
    """The PNG never replaces the log (the run's only record) or any file that is not an earlier plot:
    one line, exit 1, every file as it was, nothing new written."""
    log = tmp_path / ("log.png" if case == "log.png" else "log.txt")
    log.write_text(LOG)
    argv, needle = [log, "-o", log], "is the log itself"
    if case == "log.png":
        argv = [log]  # the default output, beside the log with .png, is the log
    elif case in ("symlink", "hardlink"):
        link = tmp_path / "plot.png"
        link.symlink_to(log) if case == "symlink" else os.link(log, link)
        argv[2] = link
    elif case == "not a png":
        (tmp_path / "notes.png").write_text("my notes")
        argv[2], needle = tmp_path / "notes.png", "exists and is not a PNG"
    elif case == "folder":
        (tmp_path / "plots").mkdir()
        argv[2], needle = tmp_path / "plots", "is a folder"
    elif case == "ymax":
        argv, needle = [log, "--ymax", "0"], "--ymax 0.0"
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    message = main_error(plot_log, argv)
    assert needle in message, message
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_cut_off_last_line_is_not_a_value(tmp_path, capsys):
    """`2 train 1.0` is what is on disk of `2 train 1.0345` while it is being written (or after a crash):
    it parses, so only its missing newline tells it is not whole. It is skipped, with one note; an
    earlier PNG at the output is replaced."""
    log = tmp_path / "log.txt"
    log.write_text(LOG + "2 train 1.0")
    streams, _, skipped = plot_log.read_log(log)
    assert streams["train"] == {0: 10.9, 1: 9.5} and skipped == 1
    out = tmp_path / "log.png"
    out.write_bytes(b"\x89PNG\r\n\x1a\n" + b"an earlier plot")
    plot_log.main([str(log)])
    assert capsys.readouterr().out.count("skipped 1 line") == 1
    assert png_size(out) == (800, 600) and sorted(p.name for p in tmp_path.iterdir()) == ["log.png", "log.txt"]
