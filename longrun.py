"""What keeps stage 7's long run from losing work (docs/long-runs.md), by concern: the process
group and stopping together, signals, the log dir's lock, log.txt, and the shards' checks.
Checkpoints are in checkpoints.py.

7_train_ddp_fineweb.py imports these; they are not the lecture's ideas, so they stay out of its
diff against stage 6, which then shows DDP, FineWeb-Edu shards, validation, HellaSwag and
checkpoints. Every function here is used by stage 7 alone and tested through it
(tests/test_ddp.py, tests/test_longrun.py).
"""
import hashlib
import os
import platform
import signal
import sys
from datetime import timedelta

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

from checkpoints import checkpoints_in, command_line, pick_checkpoint, resume_hint

try:
    import fcntl  # POSIX: flock
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# ----------------------------------------------------------------------------------------------
# the process group, and stopping together


def init_process_group(device):
    """dist.init_process_group with nccl, NVIDIA's GPU collectives, on CUDA where torch has them
    (not on Windows or macOS), gloo otherwise (it all-reduces CUDA tensors too, more slowly); made
    restartable: torchrun shares its store with the workers, and a
    worker it restarts (--max-restarts) can read the previous attempt's addresses there and never
    connect (pytorch#135712; `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` also avoids it). So each attempt
    sets up in its own namespace.

    A collective that waits longer than COLLECTIVE_TIMEOUT_S seconds (default 600: more than the
    first compile, rank 0 writing a checkpoint or a HellaSwag download take) raises in this rank,
    which then stops with lost_rank's line: a peer that died without closing its connections, or
    hangs, cannot stall the run for ever. Gloo raises by itself; NCCL only with
    TORCH_NCCL_BLOCKING_WAIT=1 (set here unless you set it), without which its watchdog aborts the
    process after the timeout, with torch's lines."""
    seconds = os.environ.get("COLLECTIVE_TIMEOUT_S", "600")
    if not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
        sys.exit(f"error: COLLECTIVE_TIMEOUT_S={seconds}: pass seconds, a number above 0")
    timeout = timedelta(seconds=float(seconds))
    backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.init_process_group(backend=backend, timeout=timeout)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    attempt = dist.PrefixStore(
        f"gpt2_attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=attempt, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def rank():
    """This process's rank, worked out here alone: the process group's once it exists, torchrun's
    RANK before (set-up), 0 without torchrun. Rank 0 prints, logs, samples and saves checkpoints."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def first_on_its_machine():
    """Each machine's first rank (torchrun's LOCAL_RANK 0) prints set-up errors: another machine's
    files may differ."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def exit_status(error, signum, master, group_alive):
    """What a run that did not finish exits with: its error line (Python prints it, exit 1) on rank
    0 or on a rank whose group is gone (no one else can say it), 1 on the other ranks (rank 0 said
    it); without an error, 128 + the signal that stopped it, as a shell reports a process a signal
    ended."""
    if error:
        return error if master or not group_alive else 1
    return 128 + signum


def stop_all_on(error, stop, lock=None):
    """All ranks stop, or none: an error that any rank found at set-up stops every rank (none is
    left waiting in a collective for one that left); the first rank of each machine prints it, and
    every rank exits 1."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        if first_on_its_machine():
            print(error, file=sys.stderr)
        close_run(stop, lock)
        sys.exit(1)


def every_rank(value):
    """Rank 0's value (a path, a list), given to every rank."""
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box)
        value = box[0]
    return value


def ranks_seen():
    """Every rank's (host, pid), gathered at set-up: a rank that dies later can then be named."""
    peers = ([(platform.node(), os.getpid())]
             * (dist.get_world_size() if dist.is_initialized() else 1))
    if dist.is_initialized():
        dist.all_gather_object(peers, (platform.node(), os.getpid()))
    return peers


def lost_rank(e, step, peers, saved):
    """The one line for a rank that died mid-run (killed, crashed), from the error its peers'
    collectives raise; `peers` is every rank's (host, pid), `saved` the newest checkpoint. Any other
    error is raised again."""
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
        raise e
    dead = [str(rank) for rank, (host, pid) in enumerate(peers)
            if host == platform.node() and not alive(pid)]
    who = f"rank {', '.join(dead)} died" if dead else "another rank stopped answering"
    return f"error: step {step}: {who}; this rank stops too, {resume_hint(saved)}"


def close_run(stop, lock, group_alive=True):
    """The end of a run, whatever ended it: the signal handlers go back (main() may run again), the
    log dir is freed, and the ranks leave the process group together (group_alive=False: a rank is
    gone, do not wait)."""
    stop.restore()
    if lock:
        lock.release()
    if dist.is_initialized() and group_alive:  # wait for rank 0's last checkpoint: a rank that
        dist.barrier()  # tears down gloo early can abort
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# signals


class StopSignals:
    """SIGTERM (a preemption, `timeout`; torchrun passes it on), SIGHUP (the terminal closed) or
    Ctrl-C. During set-up a signal ends the run at once, with one line. Once training (`.training =
    True`), it is noted in `.signum`, the step in progress finishes and is saved, and the run exits
    128 + signum. A second Ctrl-C stops at once. (Under torchrun a terminal's Ctrl-C reaches
    torchrun alone, its workers being in sessions of their own; it sends each worker one
    SIGINT.)"""

    def __init__(self):
        self.signum, self._training, self.stderr = 0, False, sys.stderr
        names = [name for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)]
        self.handlers = {getattr(signal, name): signal.signal(getattr(signal, name), self.note)
                         for name in names}
        if not first_on_its_machine():  # a machine's first rank prints set-up errors
            sys.stderr = SetUpErrorsOnce(self.stderr)

    @property
    def training(self):
        return self._training

    @training.setter
    def training(self, value):
        """Set-up is over. A set-up signal whose SystemExit some code swallowed (raised inside a
        __del__, or a callback that ignores exceptions) still ends the run here, before a step."""
        self._training = value
        if value and self.signum:
            self.restore()
            raise SystemExit(128 + self.signum)  # its line is printed
        self.unquiet()

    def note(self, signum, frame):
        if not self.training:
            if rank() == 0 and not self.signum:
                print(f"stopped by {signal.Signals(signum).name} during set-up; nothing was "
                      "trained or saved", file=sys.stderr)
            self.signum = self.signum or signum
            self.restore()
            # unwinds main(): the lock, if taken, is released with the process
            raise SystemExit(128 + signum)
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
        # the terminal is gone: print nowhere
        if signum == getattr(signal, "SIGHUP", None) and sys.stdout.isatty():
            sys.stdout = sys.stderr = open(os.devnull, "w")

    def agreed(self, device):
        """The signal any rank got (0: none), the same on every rank, so that all stop after the
        same step."""
        if not dist.is_initialized():
            return self.signum
        signum = torch.tensor(self.signum, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum.item())

    def restore(self):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        self.unquiet()

    def unquiet(self):
        if isinstance(sys.stderr, SetUpErrorsOnce):
            sys.stderr = self.stderr


class SetUpErrorsOnce:
    """stderr during set-up of a rank that is not its machine's first. A machine's ranks check the
    same flags and files, so an error found then is found by all: the first prints it, the others
    exit 1 without repeating it (this drops the `error: ...` line sys.exit prints, and its newline).
    All else is written. (Each machine's first rank prints: another machine's files may differ.)"""

    def __init__(self, stream):
        self.stream, self.dropping = stream, False

    def write(self, text):
        if text.startswith("error: ") or (self.dropping and text == "\n"):
            self.dropping = text != "\n"  # the newline print() and sys.exit write after the line
            return len(text)
        self.dropping = False
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, ...
        return getattr(self.stream, name)


# ----------------------------------------------------------------------------------------------
# one run per log dir


class LogDirLock:
    """{log_dir}/lock, held by rank 0 while it runs: an OS lock (flock; msvcrt on Windows) on the
    file, which the OS releases when the process ends however it ends (kill -9, a crash, a reboot),
    so a stale lock never blocks anyone and exactly one of several runs starting at once gets it.
    The file names the holder (pid, host, torchrun job) for the error line. On POSIX the log dir
    itself is flock'ed too, so a lock file deleted by hand frees nothing (where a folder cannot be
    locked, e.g. NFS, the file's lock alone holds); Windows cannot delete a file that is open."""

    def __init__(self, log_dir):
        self.path, self.file, self.dir = os.path.join(log_dir, "lock"), None, None

    def take(self):
        """None, or the error line of a log dir another run holds."""
        if fcntl:
            try:
                self.dir = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
                fcntl.flock(self.dir, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.in_use()
            except OSError:  # a folder this file system cannot lock: the file's lock alone
                self.free_dir()
        for _ in range(10):  # a holder removing its lock this instant: try again
            f = open(self.path, "a+")
            try:
                lock_file(f)
            except BlockingIOError:
                f.close()
                return self.in_use()
            except OSError as e:  # a file system without locks (some network or FUSE mounts)
                f.close()
                print(f"note: {self.path}: this file system cannot lock ({e.strerror}); run one "
                      "run at a time here")
                return None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a lock file its holder had just removed
                f.close()
                continue
            job = (f"{os.environ.get('TORCHELASTIC_RUN_ID', '-')} "
                   f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '-')}")
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {platform.node()} {job}\n")
            f.flush()
            self.file = f
            return None
        self.free_dir()
        return (f"error: could not take the lock {self.path}; is another run starting and stopping "
                "there?")

    def in_use(self):
        """The error line naming the holder (the lock file's pid and host; "?" once deleted)."""
        self.free_dir()
        try:
            with open(self.path) as f:
                holder = f.read().split()
        except OSError:
            holder = []
        pid, host = (holder + ["?", "?"])[:2]
        who = f"process {pid} on {host}" if holder else "another run, whose lock file was deleted"
        return (f"error: {os.path.dirname(self.path)} is in use by {who} "
                f"(its lock: {self.path}); wait for it, or choose another --log-dir")

    def free_dir(self):
        if self.dir is not None:
            os.close(self.dir)  # and with it the folder's flock
            self.dir = None

    def release(self):
        if self.file:
            try:
                # while still holding it: a run that opens it now sees another inode
                os.remove(self.path)
            except OSError:
                pass
            self.file.close()
            self.file = None
        self.free_dir()


def lock_file(f):
    """Lock the open file f for this process, or raise BlockingIOError if another process holds
    it."""
    if fcntl:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # Windows locks bytes at the file position: one fixed byte far past the text, which
        f.seek(1 << 20)  # stays readable
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except PermissionError as e:
            raise BlockingIOError(str(e)) from None


def open_log_dir(log_dir, resume, stop, print0):
    """Rank 0 locks the log dir and picks the checkpoint to continue (checkpoints.pick_checkpoint;
    None: a fresh run); every rank gets that pick. Any rank's error stops all. Returns (rank 0's
    lock or None, the pick, every rank's (host, pid), to name a rank that dies later)."""
    lock, ckpt_path, error = LogDirLock(log_dir) if rank() == 0 else None, None, None
    if lock:
        try:
            os.makedirs(log_dir, exist_ok=True)
            error = lock.take()
        except OSError as e:
            error = f"error: cannot use --log-dir {log_dir} ({e})"
        if not error:
            ckpt_path, error = pick_checkpoint(log_dir, resume, print0)
    stop_all_on(error, stop, lock)
    ckpt_path = every_rank(ckpt_path)
    # several machines: each must see the checkpoints rank 0 sees
    if dist.is_initialized() and resume:
        newest, seen = (checkpoints_in(log_dir) or ["none"])[-1], [None] * dist.get_world_size()
        dist.all_gather_object(seen, os.path.basename(newest))
        if len(set(seen)) > 1:
            error = (f"error: --resume: the newest checkpoint in {log_dir}, rank by rank: "
                     f"{', '.join(seen)}; put --log-dir on storage every node shares")
        stop_all_on(error, stop, lock)
    return lock, ckpt_path, ranks_seen()


def alive(pid):
    """Is process `pid` on this machine running? On Windows, where os.kill terminates a process,
    assume so."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the check that the process exists
        # Linux: a killed worker torchrun has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no /proc (macOS)
        return True


# ----------------------------------------------------------------------------------------------
# log.txt


class Log:
    """{log_dir}/log.txt (path None on the other ranks: they write nothing). A failed write (a full
    disk) is one line, not the end of the run, and the next write that succeeds starts on a fresh
    line: no entry is glued to a torn one."""

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
                print(f"error: could not write to {self.path} ({e}); training goes on",
                      file=sys.stderr)
            self.failed = True
        else:
            self.failed = False

    def note(self, text):
        """A # line in the log (e.g. why the run stopped); returns the text, to print it too."""
        self.write(f"# {text}\n")
        return text

    def header(self, device, world_size, model, total_batch_size, B, T, resumed_at=None):
        """The run's # lines: command, versions, device, model size and batch (plot_log.py reads the
        last)."""
        chip = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine()
        c, n_params = model.config, sum(p.numel() for p in model.parameters())
        self.write(f"# command: {command_line(resume=False)}\n"
                   f"# python {platform.python_version()} | torch {torch.__version__} | numpy "
                   f"{np.__version__} | tiktoken {tiktoken.__version__}\n"
                   f"# device: {world_size} x {device} ({chip})\n"
                   f"# model: n_layer {c.n_layer} n_head {c.n_head} n_embd {c.n_embd} "
                   f"({n_params / 1e6:.1f}M params)"
                   f" | total batch size {total_batch_size} tokens | B {B} T {T}\n"
                   + (f"# resumed at step {resumed_at}\n" if resumed_at is not None else ""))


# ----------------------------------------------------------------------------------------------
# the shards' checks (stage 7's loader calls them when the run starts; docs/data.md)


class ShardError(Exception):  # a shard that is not what fineweb.py writes; the message names it
    pass


def check_tokens(path, tokens, whole):
    """The tokens of a shard fineweb.py wrote: 1-D uint16, and (read whole: one pass, each time a
    shard is opened) GPT-2's ids, below 50257; else a ShardError naming the shard."""
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ShardError(f"{path} holds {tokens.dtype} {tokens.shape}, "
                         "not the 1-D uint16 tokens fineweb.py writes")
    if whole and len(tokens) and tokens.max() >= 50257:
        raise ShardError(f"{path} holds token id {tokens.max()}; GPT-2's ids are below 50257")
    return tokens


def shard_identity(path, tokens):
    """[size, digest] of the shard at path (tokens: its memory map, header checked): its size in
    tokens and a SHA-1 digest of its first and last MiB, so that --resume notices other tokens
    under the same names and sizes (checkpoints.other_run) for 2 MiB read per shard. Those MiB all
    zero are a failed conversion (token 0 repeated is never a corpus): ShardError. Plain reads, not
    the map: a file cut short under a memory map is SIGBUS, under a read a short read."""
    mib, start, end = 1 << 20, tokens.offset, tokens.offset + tokens.nbytes
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(min(mib, end - start))
        f.seek(max(start, end - mib))
        tail = f.read(min(mib, end - start))
    zeros = not (np.frombuffer(head, np.uint8).any() or np.frombuffer(tail, np.uint8).any())
    if len(tokens) and zeros:
        raise ShardError(f"{path} holds only zeros (token 0 repeated: a failed conversion)")
    digest = hashlib.sha1(head)  # a fingerprint, not a seal; faster than blake2b here
    digest.update(tail)
    return [len(tokens), digest.hexdigest()]


def note_skipped_tokens(sizes, step_tokens):
    """Print a note if an epoch leaves more than 1 % of the train tokens unread. A step never spans
    two shards (as in the lecture's loader), so each shard's last (size - 1) % step_tokens tokens
    are skipped: 0.38 % of a 100M-token shard at 524,288 tokens a step (no note), 47.6 % of a
    1M-token shard."""
    total, skipped = sum(sizes), sum(max(n - 1, 0) % step_tokens for n in sizes)
    if skipped > total / 100:
        print(f"note: each epoch skips {skipped:,} of the {total:,} train tokens "
              f"({100 * skipped / total:.1f} %): a step of {step_tokens:,} tokens never spans two "
              "shards, so each shard's tail short of a step is not read; larger shards "
              "(fineweb.py --shard-size) or a smaller --total-batch-size skip less")
