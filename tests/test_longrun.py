"""Overnight runs that lose nothing (stage 7 with longrun.py): one run per log dir, failed log writes,
SIGHUP, resumes that are the same run, restarts that restart, a rank that dies, damaged shards."""
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (ROOT, RUN7 as RUN, STAGE7 as NAME, TORCHRUN, assert_clean_error, load, parse_steps, run7,
                      run_script, signal_run, write_shards)

import longrun


def copy_checkpoint(src_log, dst_log, *names):
    dst_log.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst_log / name).write_bytes((src_log / name).read_bytes())


def same_losses(rows, full, rel=0.0):
    for a, b in zip(rows, full[len(full) - len(rows):]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=rel), (rows, full)


# ---------------------------------------------------------------------------- one run per log dir


def test_a_second_run_into_a_busy_log_dir_stops_and_sighup_saves_the_first(tmp_path):
    """The same command twice (a requeue, a second terminal): the second stops at once with one line naming
    the first; the first goes on untouched. Then SIGHUP (an ssh drop) stops the first as SIGTERM does:
    it finishes the step, saves it, says how to continue (also in log.txt) and exits 128 + 1."""
    shards = write_shards(tmp_path / "shards", [1000, 20000])  # a step of 8,192 tokens: ~2 s
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    log = tmp_path / "log"
    args = ["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--steps", "4",
            "--log-dir", log, "--total-batch-size", "8192"]
    cmd = [sys.executable, str(ROOT / f"{NAME}.py")] + [str(a) for a in RUN + args]
    first = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = []
    for line in first.stdout:  # the first run holds the lock once it prints a step
        head.append(line)
        if line.startswith("step "):
            break
    second = run_script(NAME, *RUN, *args)
    assert_clean_error(second, f"{log} is in use by process {first.pid} on {platform.node()}", "wait for it")
    first.send_signal(signal.SIGHUP)
    out, err = first.communicate(timeout=300)
    rows = parse_steps("".join(head) + out)
    assert first.returncode == 128 + signal.SIGHUP, out + err
    n = len(rows)
    assert [r["step"] for r in rows] == list(range(n)) and 1 <= n < 4
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", f"model_{n:05d}.pt"]  # its own, and no lock
    assert torch.load(log / f"model_{n:05d}.pt", weights_only=True)["step"] == n
    assert f"stopped after step {n - 1}; continue with: " in out.strip().splitlines()[-1]
    log_lines = (log / "log.txt").read_text().splitlines()
    assert log_lines[-1].startswith(f"# stopped after step {n - 1}; continue with: ") and "--resume" in log_lines[-1]
    assert sum(line.startswith("# command:") for line in log_lines) == 1  # the second run wrote nothing


def test_lock_of_a_live_process_another_host_or_an_earlier_torchrun_attempt(tmp_path, monkeypatch):
    """The lock names its holder; a dead holder's lock (kill -9, power loss) is taken over, a live one on this
    host is not, one on another host says how to clear it; torchrun's restart takes over its earlier attempt's."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    lock = tmp_path / "lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {platform.node()} - -\n")
        error = longrun.lock_log_dir(str(tmp_path))
        assert f"in use by process {sleeper.pid} on {platform.node()}" in error and lock.read_text().startswith(
            str(sleeper.pid))
        lock.write_text(f"{sleeper.pid} other-machine - -\n")
        assert f"if no run is alive on other-machine, delete {lock}" in longrun.lock_log_dir(str(tmp_path))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        lock.write_text(f"{sleeper.pid} other-machine job7 0\n")  # attempt 0 of this very torchrun job
        assert longrun.lock_log_dir(str(tmp_path)) is None
        assert lock.read_text() == f"{os.getpid()} {platform.node()} job7 1\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{sleeper.pid} {platform.node()} - -\n")  # its holder is gone now
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert longrun.lock_log_dir(str(tmp_path)) is None and lock.read_text().startswith(f"{os.getpid()} ")
    longrun.unlock_log_dir(str(tmp_path))
    assert not lock.exists()
    lock.write_text("4242")  # half written by a run that crashed in the middle of it
    assert longrun.lock_log_dir(str(tmp_path)) is None and lock.read_text().startswith(f"{os.getpid()} ")


# ---------------------------------------------------------------------------- log.txt that cannot be written


def test_log_write_failure_is_one_line_and_the_next_write_starts_on_a_fresh_line(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text("# command: x\n12 trai")  # torn by a full disk in the middle of a line
    log = longrun.Log(str(path))
    log.write("13 train 5.0\n")
    assert path.read_text() == "# command: x\n12 trai\n13 train 5.0\n"
    bad = longrun.Log(str(tmp_path / "no such dir" / "log.txt"))
    bad.write("0 train 1.0\n")
    bad.write("1 train 1.0\n")
    assert capsys.readouterr().err.count("error: could not write to") == 1  # once, not once per step
    longrun.Log(None).write("rank 1 writes nothing\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_for_log_txt_does_not_stop_the_run(shards_and_empty, tmp_path):
    """log.txt on a full disk (here /dev/full: every write fails with ENOSPC): one line, and the run trains on
    and writes its checkpoint."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "log.txt").symlink_to("/dev/full")
    proc, rows = run7(*shards_and_empty, "--log-dir", log, "--steps", "3", "--resume")  # --resume: appends
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write to {log / 'log.txt'}")
    assert [r["step"] for r in rows] == [0, 1, 2] and (log / "model_00003.pt").exists()


@pytest.fixture
def shards_and_empty(tmp_path):
    shards = write_shards(tmp_path / "shards", [3001, 5003, 4099, 6007, 2999])
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    return ["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl"]


# ---------------------------------------------------------------------------- a resume is the same run


def test_resume_with_a_shard_added_goes_on_exactly_with_its_own_shards(straight, tmp_path):
    """fineweb.py still writing shards while the run resumes: the new shard is not used, one line says so,
    and the losses equal the uninterrupted run's (shuffling over 5 shards would change them from step 3)."""
    data, full, straight_log = straight
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in data[1].iterdir():
        (shards / p.name).write_bytes(p.read_bytes())
    np.save(shards / "edufineweb_train_000005.npy", np.arange(7001, dtype=np.uint16))
    copy_checkpoint(straight_log, tmp_path / "log", "model_00003.pt")
    proc, rows = run7(*data, "--data-dir", shards, "--log-dir", tmp_path / "log", "--resume")
    assert "1 train shard(s) added since the run started (edufineweb_train_000005.npy, ...) are not used; " \
           "it goes on with its 4" in proc.stdout
    same_losses(rows, full)


@pytest.mark.parametrize("change", ["shard removed", "shard resized", "total batch", "seq len"])
def test_resume_that_would_be_another_run_says_what_changed(change, straight, tmp_path):
    data, _, straight_log = straight
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in data[1].iterdir():
        (shards / p.name).write_bytes(p.read_bytes())
    copy_checkpoint(straight_log, tmp_path / "log", "model_00003.pt")
    extra, needles = [], []
    if change == "shard removed":
        (shards / "edufineweb_train_000002.npy").unlink()
        needles = ["missing or resized", "edufineweb_train_000002.npy (4099 tokens)", "put them back"]
    elif change == "shard resized":
        np.save(shards / "edufineweb_train_000003.npy", np.arange(6100, dtype=np.uint16))
        needles = ["edufineweb_train_000003.npy (6007 tokens)"]
    elif change == "total batch":
        extra, needles = ["--total-batch-size", "512"], ["--total-batch-size 256 -T 32, this run has 512 and 32"]
    else:
        extra, needles = ["-T", "16"], ["--total-batch-size 256 -T 32, this run has 256 and 16"]
    proc = run_script(NAME, *RUN, *data, "--data-dir", shards, "--log-dir", tmp_path / "log", "--resume", *extra)
    assert_clean_error(proc, str(tmp_path / "log" / "model_00003.pt"), *needles)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["model_00003.pt"]  # nothing written, no lock


def test_resume_with_another_number_of_ranks_keeps_the_total_batch(straight, tmp_path):
    """One process's checkpoint, resumed by 2 ranks with the same total batch: the same run (to float error)."""
    data, full, straight_log = straight
    copy_checkpoint(straight_log, tmp_path / "log", "model_00003.pt")
    _, rows = run7(*data, "--log-dir", tmp_path / "log", "--resume", nproc=2)
    assert [r["step"] for r in rows] == [3, 4, 5]
    same_losses(rows, full, rel=1e-5)


def test_resume_of_a_finished_run_says_so(straight, tmp_path):
    data, _, straight_log = straight
    log = tmp_path / "log"
    copy_checkpoint(straight_log, log, "model_00003.pt", "model_00006.pt", "log.txt")
    before = (log / "log.txt").read_bytes()
    proc = run_script(NAME, *RUN, *data, "--log-dir", log, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"{log / 'model_00006.pt'}: the run is finished (6 of 6 steps); nothing to do" in proc.stdout
    assert not parse_steps(proc.stdout) and (log / "log.txt").read_bytes() == before  # no header appended
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_00003.pt", "model_00006.pt"]


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for name in ["model_99999.pt", "model_100000.pt", "model_00005.pt", "model_00007.pt.damaged", "model_x.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in longrun.checkpoints_in(str(tmp_path))] == [
        "model_00005.pt", "model_99999.pt", "model_100000.pt"]
    checkpoint, error = longrun.claim_log_dir(str(tmp_path), True, print)
    assert error is None and checkpoint.endswith("model_100000.pt")


# ---------------------------------------------------------------------------- restarts, and a rank that dies


def rank_pid(parent, local_rank):
    """The pid of torchrun's worker `local_rank` (read from each child's environment)."""
    for pid in map(int, open(f"/proc/{parent}/task/{parent}/children").read().split()):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers in /proc (Linux)")
def test_torchrun_max_restarts_restarts_a_killed_worker_and_ends_as_the_uninterrupted_run(tmp_path):
    """`torchrun --max-restarts 1 ... --resume` into an empty log dir starts fresh; rank 1 is killed (-9) after
    the checkpoint of step 3; rank 0 says in one line which rank died and how to continue, no traceback; torchrun
    starts both again, they resume from model_00003.pt and end with the uninterrupted run's losses."""
    shards = write_shards(tmp_path / "shards", [3001, 50021, 40009])
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    args = ["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--steps", "9",
            "--checkpoint-every", "3"]
    _, full = run7(*args, "--log-dir", tmp_path / "full")
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / f"{NAME}.py")] + [str(a) for a in RUN + args + ["--log-dir", log, "--resume"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (log / "model_00003.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "--resume: no checkpoint in" in out and f"resuming from {log / 'model_00003.pt'} after step 2" in out
    lost = [line for line in out.splitlines() if line.startswith("error: step ")]
    assert len(lost) == 1 and "rank 1 died; this rank stops too, --resume from " in lost[0], out
    assert f'{NAME}.py", line' not in out  # no traceback from any rank
    train = {}  # the log's train lines, the later one winning (the restart redoes steps after the checkpoint)
    for line in (log / "log.txt").read_text().splitlines():
        if not line.startswith("#") and line.split()[1] == "train":
            train[int(line.split()[0])] = float(line.split()[2])
    assert sorted(train) == list(range(9))
    for r in full:
        assert train[r["step"]] == pytest.approx(r["loss"], rel=1e-5)


# ---------------------------------------------------------------------------- damaged shards


@pytest.mark.parametrize("damage", ["empty", "random bytes", "cut short", "ids past the vocabulary"])
def test_damaged_shard_stops_the_run_before_it_trains(damage, shards_and_empty, tmp_path):
    """Every shard's header, dtype and size are checked when the run starts, and a shard's ids whenever it
    is opened: one line naming the file, before hours of training."""
    shards = shards_and_empty[1]
    bad = shards / "edufineweb_train_000009.npy"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "cut short":
        np.save(bad, np.arange(5000, dtype=np.uint16))
        bad.write_bytes(bad.read_bytes()[:3000])
    else:
        bad = shards / "edufineweb_val_000000.npy"  # the val shard is opened at once
        np.save(bad, np.full(4000, 50300, dtype=np.uint16))
    proc = run_script(NAME, *RUN, *shards_and_empty, "--log-dir", tmp_path / "log")
    assert_clean_error(proc, str(bad), "fineweb.py")
    assert "allow_pickle" not in proc.stderr and not parse_steps(proc.stdout)


def test_shard_with_ids_past_the_vocabulary_found_mid_run(tmp_path):
    """A later train shard with bad ids: caught when it is opened, one line with the step and what to do."""
    m = load(NAME)
    shards = write_shards(tmp_path / "shards", [3001, 3001, 3001])
    order = m.DataLoaderLite(str(shards), "train", 2, 32, 0, 1, 1337, 256).shard_order(0)
    second = shards / f"edufineweb_train_{order[1] + 1:06d}.npy"  # the shard the run opens second
    np.save(second, np.full(3001, 50300, dtype=np.uint16))
    empty = tmp_path / "no_hellaswag.jsonl"
    empty.write_text("")
    proc = run_script(NAME, *RUN, "--data-dir", shards, "--hellaswag-file", empty, "--log-dir", tmp_path / "log",
                      "--steps", "30", "--checkpoint-every", "5")
    assert_clean_error(proc, str(second), "token id 50300", "re-create it with fineweb.py, then --resume from")
    assert parse_steps(proc.stdout)  # it trained on the first shard
