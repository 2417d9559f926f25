"""What keeps stage 7's long run from losing work (README, "Long runs"), in one place.

7_train_ddp_fineweb.py imports these; they are not the lecture's ideas, so they stay out of its
diff against stage 6, which then shows DDP, FineWeb-Edu shards, validation, HellaSwag and
checkpoints. Every function here is used by stage 7 alone and tested through it (tests/test_ddp.py,
tests/test_longrun.py).

- one run per log dir: rank 0 holds {log_dir}/lock; a lock whose holder died is taken over
- a fresh run never replaces an earlier run's log.txt or checkpoints; --resume into an empty
  log dir starts fresh (so `torchrun --max-restarts N ... --resume` restarts the run)
- --resume continues the checkpoint's own run or says in one line what changed (model, total
  batch, T, train shards); checkpoints are ordered by step number
- SIGTERM, SIGHUP and Ctrl-C finish the step and save it; a failed write of log.txt or of a
  checkpoint is one line and training goes on; a rank that died is one line on its peers
- an error any rank finds at set-up stops all ranks together, with one line (out of memory is one
  rank's own: it leaves, and torchrun stops the others)
"""
import glob
import os
import platform
import re
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# stopping together


def init_process_group(backend):
    """dist.init_process_group, made restartable: torchrun shares its store with the workers, and a worker it
    restarts (--max-restarts) can read the previous attempt's addresses there and never connect (pytorch#135712;
    `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` also avoids it). So each attempt sets up in its own namespace."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.init_process_group(backend=backend)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = dist.PrefixStore(f"gpt2_attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=attempt, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def agree(error, log_dir=None):
    """All ranks stop, or none: an error that any rank found stops every rank (none is left waiting in a
    collective for one that left); the first rank of each machine prints it, rank 0 frees the log dir."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(error, file=sys.stderr)
        finish(log_dir, [], "")


def lock_log_dir(log_dir):
    """One run per log dir: rank 0 holds {log_dir}/lock (its pid, host and torchrun job) while it runs. A lock
    whose holder is gone (killed, crashed, or an earlier attempt of this torchrun job) is taken over."""
    path, host = os.path.join(log_dir, "lock"), platform.node()
    job = [os.environ.get("TORCHELASTIC_RUN_ID", "-"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "-")]
    for attempt_no in range(4):
        try:
            with open(path, "x") as f:
                f.write(f"{os.getpid()} {host} {' '.join(job)}\n")
            return None
        except FileExistsError:
            pass
        try:
            with open(path) as f:
                pid, holder, run_id, attempt = f.read().split()
        except FileNotFoundError:  # its holder just removed it: try again
            continue
        except (OSError, ValueError):  # being written this instant, or half written by a run that crashed
            if attempt_no < 2:
                time.sleep(0.2)
                continue
            pid, holder, run_id, attempt = str(os.getpid()), host, "-", "-"  # still unreadable: stale
        restarted = run_id == job[0] != "-" and attempt != job[1]  # torchrun --max-restarts started us again
        if restarted or holder == host and (pid == str(os.getpid()) or not alive(int(pid))):
            if os.path.exists(path):
                os.remove(path)  # a stale lock: take it over
            continue
        what = "wait for it" if holder == host else f"if no run is alive on {holder}, delete {path}"
        return (f"error: {log_dir} is in use by process {pid} on {holder} (its lock: {path}); {what}, "
                "or choose another --log-dir")
    return f"error: could not take the lock {path}; delete it if no run uses {log_dir}"


def unlock_log_dir(log_dir):
    path = os.path.join(log_dir, "lock")
    try:
        with open(path) as f:
            ours = f.read().split()[:1] == [str(os.getpid())]
        if ours:
            os.remove(path)
    except OSError:
        pass


def alive(pid):
    """Is process `pid` on this machine running? On Windows, where os.kill terminates a process, assume so."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the check that the process exists
        with open(f"/proc/{pid}/stat") as f:  # Linux: a killed worker torchrun has not reaped yet is a zombie
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no /proc (macOS)
        return True


def checkpoints_in(log_dir):
    """The model_{n}.pt files in log_dir, by step: a name sort would put model_99999.pt after model_100000.pt."""
    found = [(int(m.group(1)), path) for path in glob.glob(os.path.join(log_dir, "model_*.pt"))
             if (m := re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path)))]
    return [path for _, path in sorted(found)]


def claim_log_dir(log_dir, resume, print0):
    """Rank 0: lock the log dir and pick the checkpoint to continue (None: a fresh run); a fresh run never
    replaces an earlier run's log or checkpoints. (checkpoint, error)."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        error = lock_log_dir(log_dir)
    except OSError as e:
        error = f"error: cannot use --log-dir {log_dir} ({e})"
    if error:
        return None, error
    checkpoints = checkpoints_in(log_dir)
    if resume and not checkpoints:  # so that `torchrun --max-restarts N ... --resume` can start the run too
        print0(f"--resume: no checkpoint in {log_dir} yet; starting a fresh run")
    if not resume and (checkpoints or os.path.exists(os.path.join(log_dir, "log.txt"))):
        earlier = os.path.basename(checkpoints[-1]) if checkpoints else "log.txt"
        return None, (f"error: {log_dir} holds an earlier run ({earlier}); pass --resume to continue it, "
                      "or choose another --log-dir")
    return (checkpoints[-1] if checkpoints else None), None


def open_log_dir(log_dir, resume, steps, device, config, loader):
    """Rank 0 locks the log dir and picks the checkpoint to continue (none: a fresh run); every rank then loads
    that one, checked to be of this very run. Returns (its path, the checkpoint), or (None, None), and every
    rank's (host, pid), to name a rank that dies later. Any rank's error stops all; a finished run exits 0."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    say = print if master else lambda *a: None
    checkpoint, error = claim_log_dir(log_dir, resume, say) if master else (None, None)
    if dist.is_initialized():  # every rank continues from rank 0's choice, and must see the same checkpoints
        newest, seen = checkpoints_in(log_dir)[-1:] or ["none"], [None] * dist.get_world_size()
        dist.all_gather_object(seen, os.path.basename(newest[0]))
        choice = [checkpoint, error]
        dist.broadcast_object_list(choice)
        checkpoint, error = choice
        if resume and not error and len(set(seen)) > 1:  # several machines, and the log dir is not shared
            error = (f"error: --resume: the newest checkpoint in {log_dir}, rank by rank: {', '.join(seen)}; "
                     "put --log-dir on storage every node shares")
    agree(error, log_dir)
    ckpt, error = load_checkpoint(checkpoint, device, config, loader) if checkpoint else (None, None)
    agree(error, log_dir)
    if ckpt and ckpt["step"] >= steps:
        say(f"{checkpoint}: the run is finished ({ckpt['step']} of {steps} steps); nothing to do")
        finish(log_dir, [])
        sys.exit(0)
    peers = [(platform.node(), os.getpid())] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(peers, (platform.node(), os.getpid()))
    return checkpoint, ckpt, peers


def load_checkpoint(path, device, config, loader):
    """The checkpoint to resume from, checked to be of this very run. (checkpoint, error)."""
    try:  # weights_only: it holds plain types and tensors, no pickled code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # cut short (an interrupted copy, a full disk), or not a checkpoint at all
        return None, (f"error: cannot load {path} ({str(e).split('.')[0] or type(e).__name__}); nothing was "
                      f"deleted: move it out of {os.path.dirname(path)} and --resume takes the one before it")
    return ckpt, same_run(ckpt, path, config, loader)


def same_run(ckpt, path, config, loader):
    """Why this run is not the checkpoint's run (so its losses could not equal the uninterrupted run's), or None.
    A change of -B or of the number of ranks that keeps the total batch is fine: the same tokens make each step."""
    if ckpt["config"] != asdict(config):
        return (f"error: {path} holds a model with {ckpt['config']}, this run builds {asdict(config)}; "
                "pass the same --n-layer/--n-head/--n-embd")
    run, this = ckpt.get("run"), {"total_batch_size": loader.step_tokens, "T": loader.T}
    if run and run != this:  # (checkpoints of older versions of this script have no record)
        return (f"error: {path} was trained with --total-batch-size {run['total_batch_size']} -T {run['T']}, this run "
                f"has {this['total_batch_size']} and {this['T']}; pass those to continue it, or start anew in another "
                "--log-dir")
    shards = ckpt["loader"].get("shards")
    if shards:
        changed = [f"{name} ({size} tokens)" for name, size in shards if loader.sizes.get(name) != size]
        if changed:
            return (f"error: {path} trained on train shards that are now missing or resized in its --data-dir: "
                    f"{', '.join(changed[:3])}; put them back, or start anew in another --log-dir")
        added = sorted(set(loader.sizes) - {name for name, _ in shards})
        if added and (not dist.is_initialized() or dist.get_rank() == 0):  # fineweb.py still writing, say
            print(f"--resume: {len(added)} train shard(s) added since the run started ({added[0]}, ...) are not used; "
                  f"it goes on with its {len(shards)}")
        loader.shards = [os.path.join(os.path.dirname(loader.shards[0]), name) for name, _ in shards]
    return None


def stop_on_signals():
    """SIGTERM (a preemption, `timeout`; torchrun passes it on), SIGHUP (the terminal closed) or Ctrl-C: note
    it, so that the step in progress finishes and is saved. Returns ([signal number or 0], handlers to restore)."""
    got = [0]

    def note(signum, frame):
        got[0] = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
        if signum == getattr(signal, "SIGHUP", None) and sys.stdout.isatty():  # the terminal is gone: print nowhere
            sys.stdout = sys.stderr = open(os.devnull, "w")
    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)]
    return got, {s: signal.signal(s, note) for s in signals}


class Log:
    """{log_dir}/log.txt (path None on the other ranks: they write nothing). A failed write (a full disk)
    is one line, not the end of the run, and the next write that succeeds starts on a fresh line: no
    entry is glued to a torn one."""

    def __init__(self, path):
        self.path, self.failed = path, False

    def write(self, text):
        if self.path is None:  # not rank 0
            return
        try:
            with open(self.path, "a+b") as f:
                if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                    text = "\n" + text
                f.write(text.encode("utf-8"))
        except OSError as e:
            if not self.failed:  # once, until a write succeeds again
                print(f"error: could not write to {self.path} ({e}); training goes on", file=sys.stderr)
            self.failed = True
        else:
            self.failed = False

    def note(self, text):
        """A # line in the log (e.g. why the run stopped); returns the text, to print it too."""
        self.write(f"# {text}\n")
        return text

    def header(self, device, world_size, model, total_batch_size, B, T, resumed_at=None):
        """The run's # lines: command, versions, device, model size and batch (plot_log.py reads the last)."""
        chip = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine()
        c, n_params = model.config, sum(p.numel() for p in model.parameters())
        self.write(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n"
                   f"# python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__}"
                   f" | tiktoken {tiktoken.__version__}\n# device: {world_size} x {device} ({chip})\n"
                   f"# model: n_layer {c.n_layer} n_head {c.n_head} n_embd {c.n_embd} ({n_params / 1e6:.1f}M params)"
                   f" | total batch size {total_batch_size} tokens | B {B} T {T}\n"
                   + (f"# resumed at step {resumed_at}\n" if resumed_at is not None else ""))


def save_checkpoint(path, state):
    """Write atomically (a .tmp file, renamed): a crash mid-write never leaves a torn checkpoint. A failed write
    (a full disk) is one line; the earlier checkpoints stay as they are. Returns "--resume from PATH", or None."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        return f"--resume from {path}"
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        print(f"error: could not write {path} ({e}); removed its .tmp, kept the earlier ones", file=sys.stderr)
        return None


def resume_command(resumed):
    """The command that continues this run (on one machine; on several, the same torchrun lines + --resume)."""
    ddp = dist.is_initialized()
    cmd = [f"torchrun --standalone --nproc_per_node={dist.get_world_size()}" if ddp else "python"] + sys.argv
    return " ".join(cmd) + ("" if resumed else " --resume")


def lost_rank(e, step, peers, resume, resumed):
    """The one line for a rank that died mid-run (killed, crashed), from the error its peers' collectives
    raise; `peers` is every rank's (host, pid). Any other error is raised again, traceback and all."""
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
        raise e
    dead = [str(rank) for rank, (host, pid) in enumerate(peers) if host == platform.node() and not alive(pid)]
    who = f"rank {', '.join(dead)} died" if dead else "another rank stopped answering"
    return f"error: step {step}: {who}; this rank stops too, {resume}: {resume_command(resumed)}"


def finish(log_dir, losses, error=None, signum=0, handlers=None, ddp=None):
    """The end of a run, whatever ended it: put the signal handlers back (main() may run again), free the log
    dir, leave the process group together (ddp=False: a rank is gone) and exit with the reason: an error
    (rank 0 prints it; "": exit 1 silently), or 128 + a signal's number, as a shell reports a stopped process."""
    for s, handler in (handlers or {}).items():
        signal.signal(s, handler)
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master and log_dir:
        unlock_log_dir(log_dir)
    if dist.is_initialized() and ddp is not False:  # wait for rank 0's last checkpoint: a rank that tears
        dist.barrier()  # down gloo early can abort
        dist.destroy_process_group()
    if error is not None or signum:
        sys.exit((error if master and error else 1) if error is not None else 128 + signum)
    return losses
