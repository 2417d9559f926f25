"""Stage 7's checkpoints, all in one place: what model_{n:05d}.pt holds, writing, finding and
loading one, the check that --resume continues the very run that wrote it, and restoring its state
(docs/long-runs.md).

A checkpoint is the state after n optimisation steps: model, optimizer, grad scaler, data-loader
position (with the train shards' names, sizes and digests of their ends), the CPU RNG, the last val
loss and `val_step`, the step it was measured at (the loss of the state after val_step steps: up to
--eval-every - 1 steps older than the weights), the model config (a plain dict), and `run`: every
setting that decides the run's trajectory. A state holding nan or inf is never written.
`--resume` continues exactly, so the resumed run's
losses equal the uninterrupted run's, or names in one line what differs and what to pass. -B, the
number of ranks, the device and the evaluation, checkpoint and sampling flags may change: the same
tokens make each step.
"""
import errno
import glob
import math
import os
import re
import shlex
import sys
import textwrap
from dataclasses import asdict

import torch

# The one table of what decides a run's trajectory: a checkpoint's `run` key -> the flag that
# sets it. run_record and --help's text are made from it; the model config and the shards are
# checked too.
TRAJECTORY_FLAGS = {"seed": "--seed", "max_lr": "--max-lr", "warmup_steps": "--warmup-steps",
                    "steps": "--steps", "total_batch_size": "--total-batch-size", "T": "-T"}
MODEL_FLAGS = ("--n-layer", "--n-head", "--n-embd")
RESUME_MAY_CHANGE = textwrap.fill(  # --help's last lines
    "--resume continues the run exactly: the model, the train shards and every flag that decides "
    f"the run ({' '.join([*TRAJECTORY_FLAGS.values(), *MODEL_FLAGS])}) are stored in each "
    "checkpoint and checked. These may change on --resume: -B and the number of GPUs (the same "
    "tokens make each step), --device, --compile, --dtype (another dtype's rounding differs "
    "slightly), --data-dir (holding the same shards), --eval-every, --val-tokens, "
    "--hellaswag-file, --hellaswag-limit, --checkpoint-every, --num-return-sequences, "
    "--max-length, --peak-tflops, --log-dir (moved whole).", 100,
    break_on_hyphens=False)


def run_record(args, total_batch_size, T):
    """This run's trajectory settings, as a checkpoint stores them: TRAJECTORY_FLAGS' keys, with the
    total batch and T the run uses (the CPU default of --total-batch-size is worked out from -B and
    -T)."""
    values = {**vars(args), "total_batch_size": total_batch_size, "T": T}
    return {key: values[key] for key in TRAJECTORY_FLAGS}


def checkpoint_state(model, optimizer, scaler, loader, step, val, run):
    """What model_{step:05d}.pt holds: enough to continue exactly (restore), and what makes it this
    run. `val`: (the step the last val loss was measured at, that loss); None before the first."""
    val_step, val_loss = val or (None, None)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": asdict(model.config),
            "step": step, "val_loss": val_loss, "val_step": val_step, "scaler": scaler.state_dict(),
            "loader": loader.state_dict(), "run": run, "rng": {"cpu": torch.get_rng_state()}}


def save_checkpoint(log_dir, state, saved, last):
    """Write model_{step:05d}.pt. A failed write (a full disk) is one line and training goes on, the
    earlier checkpoints kept; if it was the run's last (the end, or a signal), the line, naming the
    newest checkpoint on disk, is returned for the caller to end the run with. Returns (the newest
    checkpoint on disk, that line or None)."""
    path = os.path.join(log_dir, f"model_{state['step']:05d}.pt")
    bad = not_finite(state)
    if bad:  # diverging (the next step's loss stops it): never a checkpoint one cannot train on
        line = (f"error: {path} is not written: its {bad} holds nan or inf; start again with a "
                "lower --max-lr or a longer --warmup-steps in a new --log-dir; or, if it was a "
                f"one-off fault, {resume_hint(saved)}")
        if last:
            return saved, line
        print(line, file=sys.stderr)
        return saved, None
    failed = write_atomically(path, state)
    if not failed:
        return path, None
    if last:  # the run ends with its last steps unsaved: not a success
        return saved, f"error: could not write {path} ({failed}); {resume_hint(saved)}"
    print(f"error: could not write {path} ({failed}); training goes on", file=sys.stderr)
    return saved, None


def not_finite(state):
    """The name of the first weight or optimizer tensor in `state` holding nan or inf, or None. The
    optimizer's state dict is walked whole: AdamW's, or stage 8's Muon and AdamW together."""
    for name, t in [*state["model"].items(), *tensors(state["optimizer"], "optimizer")]:
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def tensors(tree, name):
    """(a name, the tensor) for every tensor in nested dicts and lists, such as a state dict."""
    if torch.is_tensor(tree):
        yield name, tree
    elif isinstance(tree, (dict, list, tuple)):
        for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
            yield from tensors(value, f"{name} {key}")


def write_atomically(path, state):
    """torch.save to a .tmp file, flushed to disk, then renamed: a crash mid-write never leaves a
    torn checkpoint. Returns None, or what went wrong (the .tmp removed)."""
    tmp = path + ".tmp"
    try:
        # through a Python file: a full disk is OSError ENOSPC, not torch's
        with open(tmp, "wb") as f:
            torch.save(state, f)  # "[enforce fail at inline_container.cc] unexpected pos"
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return None
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if getattr(e, "errno", None) == errno.ENOSPC:
            return f"the disk is full at {os.path.dirname(path) or '.'}"
        return f"{type(e).__name__}: {e}"


def checkpoints_in(log_dir):
    """The model_{n}.pt files in log_dir, by step: a name sort would put model_99999.pt after
    model_100000.pt."""
    return [path for _, path in sorted(checkpoint_steps(log_dir))]


def checkpoint_steps(log_dir):
    """(n, path) for each model_{n}.pt in log_dir."""
    paths = glob.glob(os.path.join(glob.escape(log_dir), "model_*.pt"))
    return [(int(m.group(1)), path) for path in paths
            if (m := re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path)))]


def pick_checkpoint(log_dir, resume, print0):
    """The checkpoint a run continues from: on --resume the newest in log_dir, None for a fresh run
    (also on --resume into a log dir without one, so that `torchrun --max-restarts N ... --resume`
    starts the run too). A fresh run never replaces an earlier run's log.txt or checkpoints. (path,
    error line)."""
    found = checkpoints_in(log_dir)
    steps = [n for n, _ in checkpoint_steps(log_dir)]
    twin = next((n for n in steps if steps.count(n) > 1), None)
    if resume and twin is not None:  # model_00004.pt and model_4.pt: one came from another run
        names = sorted(os.path.basename(p) for n, p in checkpoint_steps(log_dir) if n == twin)
        return None, (f"error: {log_dir} holds {len(names)} checkpoints of step {twin} "
                      f"({', '.join(names)}); this run writes model_{twin:05d}.pt: move the others "
                      f"out of {log_dir}, then --resume")
    if resume and not found:
        print0(f"--resume: no checkpoint in {log_dir} yet; starting a fresh run")
    if not resume and (found or os.path.exists(os.path.join(log_dir, "log.txt"))):
        earlier = os.path.basename(found[-1]) if found else "log.txt"
        return None, (f"error: {log_dir} holds an earlier run ({earlier}); pass --resume to "
                      "continue it, or choose another --log-dir")
    return (found[-1] if resume and found else None), None


def load_checkpoint(path, device, config, run, shard_sizes):
    """(the checkpoint, None), or (None, the error line): it cannot be read, or it is another run's
    (other_run); (None, None) for no path (a fresh run). weights_only: plain types and tensors, no
    pickled code; torch's legacy (non-zip) format loads too."""
    if path is None:
        return None, None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if (not isinstance(ckpt, dict)
                or not {"model", "optimizer", "config", "step", "loader"} <= set(ckpt)):
            raise ValueError("not a checkpoint of 7_train_ddp_fineweb.py")
    # cut short (an interrupted copy, a full disk), or not a checkpoint at all
    except Exception as e:
        return None, (f"error: cannot load {path} ({str(e).split('.')[0] or type(e).__name__}); "
                      f"nothing was deleted: move it out of {os.path.dirname(path)} and --resume "
                      "takes the one before it")
    error = other_run(ckpt, path, config, run, shard_sizes)
    return (None, error) if error else (ckpt, None)


def other_run(ckpt, path, config, run, shard_sizes):
    """Why this run is not the checkpoint's (its losses could not equal the uninterrupted run's):
    one error line naming every difference and what to pass; None if it is the same run."""
    if ckpt["config"].keys() != asdict(config).keys():  # stage 7's GPT-2 or stage 8's: other models
        modern = "logit_softcap" in ckpt["config"]
        writer = "8_train_modern.py" if modern else "7_train_ddp_fineweb.py"
        return f"error: {path} is a checkpoint of {writer}, another model; continue with {writer}"
    if ckpt["config"] != asdict(config):
        return (f"error: {path} holds a model with {ckpt['config']}, this run builds "
                f"{asdict(config)}; pass the same --n-layer/--n-head/--n-embd")
    theirs = ckpt.get("run") or {}  # (checkpoints of older versions of this script record less)
    if ckpt["step"] >= theirs.get("steps", math.inf) and run["steps"] != theirs["steps"]:
        done = finished(path, ckpt["step"], theirs["steps"])
        return f"error: {done} and cannot be extended; {LONGER}"
    differ = [key for key in TRAJECTORY_FLAGS if key in theirs and theirs[key] != run[key]]
    if differ:
        was = " ".join(f"{TRAJECTORY_FLAGS[k]} {theirs[k]}" for k in differ)
        now = " ".join(f"{TRAJECTORY_FLAGS[k]} {run[k]}" for k in differ)
        return (f"error: {path} was trained with {was}, this run has {now}; pass {was} to continue "
                "it exactly, or start anew in another --log-dir")
    shards = ckpt["loader"].get("shards", [])  # [name, size, digest] ([name, size] before digests)
    changed = [f"{name} ({size} tokens)" for name, size, *_ in shards
               if shard_sizes.get(name, [None])[0] != size]
    if changed:
        return (f"error: {path} trained on train shards that are now missing or resized in its "
                f"--data-dir: {', '.join(changed[:3])}; put them back, or start anew in another "
                "--log-dir")
    other = [name for name, _, *digest in shards if digest and shard_sizes[name][1:] != digest]
    if other:  # the same names and sizes, other tokens (their first or last MiB differ)
        return (f"error: {path} trained on other tokens than this --data-dir's train shards of the "
                f"same names and sizes: {', '.join(other[:3])}; pass the --data-dir it trained on, "
                "or start anew in another --log-dir")
    return None


def restore(ckpt, path, model, optimizer, scaler, loader, steps, print0):
    """The state after ckpt["step"] steps (the loader reads the checkpoint's own train shards), and
    a line saying so (print0: rank 0's print). Returns (the first step to run, (the step of the
    last val loss, that loss)); (0, None) without a checkpoint."""
    if ckpt is None:
        return 0, None
    if ckpt["step"] >= steps:
        print0(f"{finished(path, ckpt['step'], steps)}; nothing to do ({LONGER})")
        return ckpt["step"], (ckpt.get("val_step"), ckpt["val_loss"])
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # float16 runs only: a disabled scaler has no state
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])  # and with it the checkpoint's own list of train shards
    added = sorted(set(loader.sizes) - {name for name, *_ in ckpt["loader"].get("shards", [])})
    if added and ckpt["loader"].get("shards"):
        # fineweb.py still writing, say
        print0(f"--resume: {len(added)} train shard(s) added since the run started ({added[0]}, "
               f"...) are not used; it goes on with its {len(ckpt['loader']['shards'])}")
    torch.set_rng_state(ckpt["rng"]["cpu"].cpu())  # map_location moved it to the device
    unrecorded = [flag for key, flag in TRAJECTORY_FLAGS.items()
                  if key not in (ckpt.get("run") or {})]
    if any(len(entry) < 3 for entry in ckpt["loader"].get("shards") or [[]]):  # no digests yet
        unrecorded.append("the train shards' contents")
    if unrecorded:  # written by an older version of stage 7
        print0(f"note: {path} does not record {', '.join(unrecorded)}; pass the values (and the "
              "--data-dir) it was trained with")
    print0(f"resuming from {path} after step {ckpt['step'] - 1}")
    return ckpt["step"], (ckpt.get("val_step"), ckpt["val_loss"])


def finished(path, step, steps):
    return f"{path}: the run is finished ({step} of {steps} steps)"


# a finished run's LR schedule has decayed to its end: a longer run has another, so it is a new run
LONGER = "to train longer, start a new run with a larger --steps in another --log-dir"


def command_line(resume):
    """This run's command, shell-quoted (a --log-dir with a space stays one argument), with --resume
    if asked. Under torchrun on several machines, the line to run on each of them, with the
    rendezvous flags left to the reader."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = "python"
    if "RANK" in os.environ:  # torchrun: sys.argv[0] is the script's path, as for python
        launcher = (f"torchrun --standalone --nproc_per_node={local}" if local == world else
                    f"on each machine: torchrun --nnodes={world // local} "
                    f"--nproc_per_node={local} (+ rdzv flags)")
    argv = sys.argv + (["--resume"] if resume and "--resume" not in sys.argv else [])
    return launcher + " " + shlex.join(argv)


def resume_hint(saved, diverged=False):
    """What a line that ends the run suggests: the command that continues from the newest checkpoint
    on disk, or, before the first one, the same command (--resume in a log dir without checkpoints
    starts afresh). After a divergence that is for a one-off fault; else start in a new log dir."""
    command = command_line(resume=True)
    hint = (f"continue from {saved} with: {command}" if saved
            else f"nothing is saved yet; start again with: {command}")
    return f" in a new --log-dir; or, if it was a one-off fault, {hint}" if diverged else hint
