"""Overnight runs that lose nothing (stage 7 with longrun.py): one run per log dir, failed log writes,
SIGHUP, resumes that are the same run, restarts that restart, a rank that dies, damaged shards."""
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (ROOT, RUN7 as RUN, STAGE7 as NAME, TORCHRUN, assert_clean_error, child_env, load,
                      parse_steps, run7, run_here, signal_run, write_shards)

import checkpoints
import longrun


def copy_checkpoint(src_log, dst_log, *names):
    dst_log.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst_log / name).write_bytes((src_log / name).read_bytes())


def same_losses(rows, full, rel=0.0):
    for a, b in zip(rows, full[len(full) - len(rows):]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=rel), (rows, full)


# ---------------------------------------------------------------------------- one run per log dir


@pytest.mark.slow
def test_a_second_run_into_a_busy_log_dir_stops_and_sighup_saves_the_first(tmp_path):
    """The same command twice (a requeue, a second terminal): the second stops at once with one line naming
    the first; the first goes on untouched. Then SIGHUP (an ssh drop) stops the first as SIGTERM does:
    it finishes the step, saves it, says how to continue (also in log.txt) and exits 128 + 1."""
    shards = write_shards(tmp_path / "shards", [1000, 20000])
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    log = tmp_path / "log"
    steps = 100000  # short steps, and more of them than the test can wait for: the signal comes first
    args = ["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--steps", steps,
            "--log-dir", log]
    cmd = [sys.executable, str(ROOT / f"{NAME}.py")] + [str(a) for a in RUN + args]
    first = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = []
    for line in first.stdout:  # the first run holds the lock once it prints a step
        head.append(line)
        if line.startswith("step "):
            break
    second = run_here(NAME, *RUN, *args)
    assert_clean_error(second, f"{log} is in use by process {first.pid} on {platform.node()}", "wait for it")
    first.send_signal(signal.SIGHUP)
    out, err = first.communicate(timeout=300)
    rows = parse_steps("".join(head) + out)
    assert first.returncode == 128 + signal.SIGHUP, out + err
    n = len(rows)
    assert [r["step"] for r in rows] == list(range(n)) and 1 <= n < steps
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", f"model_{n:05d}.pt"]  # its own, and no lock
    assert torch.load(log / f"model_{n:05d}.pt", weights_only=True)["step"] == n
    stopped = f"stopped after step {n - 1}; continue from {log / f'model_{n:05d}.pt'} with: "
    assert out.strip().splitlines()[-1].startswith(stopped)
    log_lines = (log / "log.txt").read_text().splitlines()
    assert log_lines[-1].startswith(f"# {stopped}") and "--resume" in log_lines[-1]
    assert sum(line.startswith("# command:") for line in log_lines) == 1  # the second run wrote nothing


@pytest.mark.slow  # a holder in another process
def test_lock_is_held_by_a_live_run_and_never_by_a_stale_file(tmp_path):
    """The lock is the OS's (flock), held while its process lives: a live holder's stops a second run with its pid
    and host; a lock file whose process is gone (kill -9, a crash) or whose pid now belongs to an unrelated process
    (after a reboot), or that is half written, is taken over."""
    hold = ("import sys, time, longrun; lock = longrun.LogDirLock(sys.argv[1]); assert lock.take() is None; "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = longrun.LogDirLock(str(tmp_path)).take()
        assert f"{tmp_path} is in use by process {holder.pid} on {platform.node()}" in error and "wait for it" in error
    finally:
        holder.kill()
        holder.wait()
    lock = tmp_path / "lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for stale in [f"{holder.pid} {platform.node()} - -\n", f"{sleeper.pid} {platform.node()} - -\n", "4242"]:
            lock.write_text(stale)  # a dead holder's; a live but unrelated process's pid; half written
            ours = longrun.LogDirLock(str(tmp_path))
            assert ours.take() is None and lock.read_text().startswith(f"{os.getpid()} {platform.node()} ")
            ours.release()
            assert not lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def take_and_report(log_dir, barrier, results, release):
    barrier.wait(timeout=60)
    lock = longrun.LogDirLock(log_dir)
    got = lock.take() is None
    results.put(got)
    if got:
        release.wait(timeout=60)  # hold it until every contender has tried
        lock.release()


@pytest.mark.slow  # 48 processes
@pytest.mark.skipif(os.name == "nt", reason="forks")
def test_a_stale_lock_is_taken_over_by_exactly_one_of_several_runs_starting_at_once(tmp_path):
    """Four runs start at the same instant on a log dir with a stale lock file: exactly one gets it, every time
    (the lock used to be check-then-remove, and two won in 5-14 % of such trials)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for trial in range(12):
        log_dir = tmp_path / f"trial{trial}"
        log_dir.mkdir()
        (log_dir / "lock").write_text("999999 " + platform.node() + " - -\n")  # its holder is long gone
        barrier, results, release = ctx.Barrier(4), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=take_and_report, args=(str(log_dir), barrier, results, release))
                 for _ in range(4)]
        for p in procs:
            p.start()
        winners = sum(results.get(timeout=60) for _ in procs)  # bounded: a contender that hangs fails the test
        release.set()
        for p in procs:
            p.join(timeout=60)
        assert winners == 1, f"trial {trial}: {winners} runs got the lock"


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


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
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


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
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


@pytest.mark.parametrize("change", ["shard removed", "shard resized", "total batch", "seq len", "seed and schedule"])
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
        extra, needles = ["--total-batch-size", "512"], ["--total-batch-size 256, this run has --total-batch-size 512"]
    elif change == "seq len":
        extra, needles = ["-T", "16"], ["trained with -T 32, this run has -T 16; pass -T 32 to continue it exactly"]
    else:  # another seed reorders the shards; another schedule runs step 3 at another LR: all named in one line
        extra = ["--seed", "7", "--max-lr", "1e-3", "--warmup-steps", "2", "--steps", "8"]
        needles = ["trained with --seed 1337 --max-lr 0.0006 --warmup-steps 10 --steps 6, this run has --seed 7 "
                   "--max-lr 0.001 --warmup-steps 2 --steps 8; pass --seed 1337 --max-lr 0.0006 --warmup-steps 10 "
                   "--steps 6 to continue it exactly"]
    proc = run_here(NAME, *RUN, *data, "--data-dir", shards, "--log-dir", tmp_path / "log", "--resume", *extra)
    assert_clean_error(proc, str(tmp_path / "log" / "model_00003.pt"), *needles)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["model_00003.pt"]  # nothing written, no lock


def test_every_flag_is_checked_on_resume_or_said_in_help_to_be_free_to_change(capsys):
    """A flag added later cannot silently change a resumed run: each is stored and checked (checkpoints.py), or
    --help says that it may change on --resume."""
    import re
    m = load(NAME)
    with pytest.raises(SystemExit):
        m.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "These may change on --resume:" in help_text
    checked = set(checkpoints.TRAJECTORY_FLAGS.values()) | set(checkpoints.MODEL_FLAGS)
    for action in m.make_parser()._actions:
        names = [o for o in action.option_strings if o not in ("-h", "--help", "--resume")]
        epilog = help_text.split("--resume continues the run exactly")[-1]
        said = [o for o in names if re.search(re.escape(o) + r"(?![\w-])", epilog)]
        assert not names or said or checked & set(names), names


def test_resume_of_a_finished_run_says_so(straight, tmp_path):
    data, _, straight_log = straight
    log = tmp_path / "log"
    copy_checkpoint(straight_log, log, "model_00003.pt", "model_00006.pt", "log.txt")
    before = (log / "log.txt").read_bytes()
    proc = run_here(NAME, *RUN, *data, "--log-dir", log, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"{log / 'model_00006.pt'}: the run is finished (6 of 6 steps); nothing to do" in proc.stdout
    assert not parse_steps(proc.stdout) and (log / "log.txt").read_bytes() == before  # no header appended
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_00003.pt", "model_00006.pt"]


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for name in ["model_99999.pt", "model_100000.pt", "model_00005.pt", "model_00007.pt.damaged", "model_x.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in checkpoints.checkpoints_in(str(tmp_path))] == [
        "model_00005.pt", "model_99999.pt", "model_100000.pt"]
    checkpoint, error = checkpoints.pick_checkpoint(str(tmp_path), True, print)
    assert error is None and checkpoint.endswith("model_100000.pt")


# ---------------------------------------------------------------------------- restarts, and a rank that dies


def rank_pid(parent, local_rank):
    """The pid of torchrun's worker `local_rank` (read from each child's environment)."""
    for pid in map(int, open(f"/proc/{parent}/task/{parent}/children").read().split()):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return pid
    return None


@pytest.mark.slow
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
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (log / "model_00003.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "--resume: no checkpoint in" in out and f"resuming from {log / 'model_00003.pt'} after step 2" in out
    lost = [line for line in out.splitlines() if line.startswith("error: step ")]
    assert len(lost) == 1 and "rank 1 died; this rank stops too, continue from " in lost[0], out
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
    proc = run_here(NAME, *RUN, *shards_and_empty, "--log-dir", tmp_path / "log")
    assert_clean_error(proc, str(bad), "fineweb.py")
    assert "allow_pickle" not in proc.stderr and not parse_steps(proc.stdout)


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_shard_with_ids_past_the_vocabulary_found_mid_run(tmp_path):
    """A later train shard with bad ids: caught when it is opened, one line with the step and what to do."""
    m = load(NAME)
    shards = write_shards(tmp_path / "shards", [3001, 3001, 3001])
    order = m.DataLoaderLite(str(shards), "train", 2, 32, 0, 1, 1337, 256).shard_order(0)
    second = shards / f"edufineweb_train_{order[1] + 1:06d}.npy"  # the shard the run opens second
    np.save(second, np.full(3001, 50300, dtype=np.uint16))
    empty = tmp_path / "no_hellaswag.jsonl"
    empty.write_text("")
    proc = run_here(NAME, *RUN, "--data-dir", shards, "--hellaswag-file", empty, "--log-dir", tmp_path / "log",
                      "--steps", "30", "--checkpoint-every", "5")
    assert_clean_error(proc, str(second), "token id 50300", "re-create it with fineweb.py, then continue from")
    assert parse_steps(proc.stdout)  # it trained on the first shard


# ---------------------------------------------------------------------------- every exit tells the truth


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_run_whose_last_checkpoint_cannot_be_written_fails_and_says_so(shards_and_empty, tmp_path):
    """The last checkpoint on a full disk (its .tmp is /dev/full: ENOSPC): the run does not end as a success; the
    line says "the disk is full" in words, and its resume command names the newest checkpoint that exists."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "model_00003.pt.tmp").symlink_to("/dev/full")
    proc = run_here(NAME, *RUN, *shards_and_empty, "--log-dir", log, "--steps", "3", "--checkpoint-every", "2")
    assert_clean_error(proc, f"could not write {log / 'model_00003.pt'} (the disk is full at {log})",
                       f"continue from {log / 'model_00002.pt'} with: ")
    assert proc.returncode == 1 and [r["step"] for r in parse_steps(proc.stdout)] == [0, 1, 2]
    assert "enforce fail" not in proc.stderr  # torch's own words for a full disk
    assert (log / "log.txt").read_text().splitlines()[-1] == "# " + proc.stderr.strip().splitlines()[-1]  # logged
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_00002.pt"]  # no .tmp, no lock left


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_stop_that_could_not_be_saved_names_no_checkpoint(shards_and_empty, tmp_path):
    """SIGTERM, and its checkpoint cannot be written: exit 1 (not 143, a clean stop), and no resume command for a
    checkpoint that does not exist: nothing is saved yet, the same command with --resume starts again."""
    log = tmp_path / "log"
    log.mkdir()
    for n in (1, 2, 3):
        (log / f"model_{n:05d}.pt.tmp").symlink_to("/dev/full")
    proc = signal_run([*shards_and_empty, "--log-dir", log, "--steps", "6"], [signal.SIGTERM])
    n = len(parse_steps(proc.stdout))
    assert_clean_error(proc, f"could not write {log / f'model_{n:05d}.pt'} (the disk is full at {log})",
                       "nothing is saved yet; start again with: python ")
    assert proc.returncode == 1 and "continue from" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
def test_ctrl_c_under_torchrun_saves_the_step_and_one_process_goes_on(straight, tmp_path):
    """Ctrl-C in a terminal goes to its foreground process group: torchrun, which passes one SIGINT to each worker
    (they run in sessions of their own). The run finishes the step, saves it and prints its own line, with a
    command that pastes (the log dir has a space). torchrun itself then ends with its own SignalException
    traceback and exit 1, which is torch's (docs/long-runs.md). The 2 ranks' checkpoint, resumed by one process
    with the same total batch, goes on as the uninterrupted one-process run (to float error)."""
    data, full, _ = straight
    log = tmp_path / "log dir"  # a space: the printed command must still paste
    cmd = TORCHRUN + [f"{NAME}.py"] + [str(a) for a in RUN + data + ["--log-dir", log]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("step "):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    out = "".join(head) + out
    n = len(parse_steps(out))
    stopped = [line for line in out.splitlines() if line.startswith("stopped after step")]
    assert stopped and stopped[0].startswith(f"stopped after step {n - 1}; continue from {log / f'model_{n:05d}.pt'}")
    assert (log / f"model_{n:05d}.pt").exists() and f'{NAME}.py", line' not in err
    command = shlex.split(stopped[0].split(" with: ", 1)[1])
    assert command[:2] == ["torchrun", "--standalone"] and command[command.index("--log-dir") + 1] == str(log)
    _, rows = run7(*data, "--log-dir", log, "--resume")
    assert [r["step"] for r in rows] == list(range(n, 6))
    same_losses(rows, full, rel=1e-5)


def test_exit_status_gives_the_error_once_and_a_signal_as_a_shell_does():
    error = "error: step 3: rank 1 died; ..."
    assert longrun.exit_status(error, 0, master=True, group_alive=True) == error  # Python prints it, exit 1
    assert longrun.exit_status(error, 0, master=False, group_alive=True) == 1  # rank 0 says it
    assert longrun.exit_status(error, 0, master=False, group_alive=False) == error  # no one else can
    assert longrun.exit_status(None, signal.SIGTERM, master=False, group_alive=True) == 128 + signal.SIGTERM


def test_the_resume_hint_is_made_only_for_a_line_that_is_printed(shards_and_empty, tmp_path, monkeypatch):
    """It lists the checkpoints and quotes the command: work a step should not do when nothing stopped."""
    m, calls = load(NAME), []
    monkeypatch.setattr(m, "resume_hint", lambda saved: calls.append(saved) or "continue from ...")
    run7(*shards_and_empty, "--log-dir", tmp_path / "log", "--steps", "3")
    assert calls == []
