"""Faults of issue 28 (round four) and issue 27's dead rank and checkpoint val step: each gives one
line naming the problem and what to do, a non-zero exit where the run cannot go on, and nothing
lost."""

import importlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    RUN7,
    STAGE7,
    SCRIPTS,
    TINY,
    TORCHRUN,
    load,
    main_error,
    main_steps,
    parse_steps,
    write_shards,
)

import checkpoints
import longrun


@pytest.fixture
def run_args(tmp_path):
    """Stage 7's tiny in-process run: shards in tmp_path, HellaSwag off (an empty file, which says
    so)."""
    shards = write_shards(tmp_path / "shards", [3001, 5003, 4099])
    (tmp_path / "empty.jsonl").write_text("")
    return RUN7 + [
        "--data-dir",
        shards,
        "--hellaswag-file",
        tmp_path / "empty.jsonl",
        "--log-dir",
        tmp_path / "log",
    ]


def quiet(fn, *args):
    """fn(*args) with its stdout and stderr caught: (its result or SystemExit, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            result = fn(*args)
        except SystemExit as e:
            result = e
    return result, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------- 3: two checkpoints of one step


def test_two_checkpoints_of_one_step_are_named_not_picked(tmp_path):
    """model_00004.pt of this run and model_4.pt copied from another: --resume names both and picks
    neither (it took model_4.pt, and its line led into continuing the other run)."""
    for name in ["model_00002.pt", "model_00004.pt", "model_4.pt"]:
        (tmp_path / name).write_bytes(b"")
    path, error = checkpoints.pick_checkpoint(str(tmp_path), True, print)
    assert path is None and error.startswith(
        f"error: {tmp_path} holds 2 checkpoints of step 4 "
        "(model_00004.pt, model_4.pt); this run writes model_00004.pt"
    )
    assert (
        "\n" not in error and sorted(p.name for p in tmp_path.iterdir())[-1] == "model_4.pt"
    )  # kept


# ----------------------------------------------------------------- 4: the lock file deleted by hand


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot delete an open file: nothing to test")
def test_a_lock_file_deleted_by_hand_still_holds_the_log_dir(tmp_path):
    """Run A holds the log dir; its `lock` file is deleted by hand; run B must still be refused (it
    started too, and both wrote log.txt). Once A releases it, B gets it."""
    a, b = longrun.LogDirLock(str(tmp_path)), longrun.LogDirLock(str(tmp_path))
    assert a.take() is None
    os.remove(tmp_path / "lock")
    error = b.take()
    assert error == (
        f"error: {tmp_path} is in use by another run, whose lock file was deleted "
        f"(its lock: {tmp_path / 'lock'}); wait for it, or choose another --log-dir"
    )
    a.release()
    assert b.take() is None and (tmp_path / "lock").read_text().split()[0] == str(os.getpid())
    b.release()
    assert not (tmp_path / "lock").exists()


# ---------------------------------------------------------------------------- 6: --max-lr inf


@pytest.mark.parametrize(
    "name, flag",
    [
        ("6_train_hyperparams", "--max-lr"),
        (STAGE7, "--max-lr"),
        ("5_train_speedup", "--peak-tflops"),
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_a_float_flag_takes_finite_values_only(name, flag, value):
    with pytest.raises(
        SystemExit
    ) as e:  # parse_args alone: a wrong pass would train the 124M model
        load(name).make_parser().parse_args([flag, value])
    assert e.value.code == f"error: argument {flag}: got {value}; pass a number 0 or more"


def tiny_state(step, poison=None):
    """A checkpoint state of a tiny GPT after one AdamW step, with `poison` (a weight name) set to
    inf."""
    m = load(STAGE7)
    model = m.GPT(m.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if poison:
        state["model"][poison][0] = float("inf")
    return state


def test_no_checkpoint_that_holds_inf_or_nan_is_written(tmp_path, capsys):
    """A state whose weights went non-finite (a diverging run) is never saved: one line, the earlier
    checkpoint named; the run's last save (the end, a signal) returns that line to end the run with.
    """
    log = str(tmp_path)
    saved, error = checkpoints.save_checkpoint(log, tiny_state(1), None, last=False)
    assert saved == os.path.join(log, "model_00001.pt") and error is None
    bad = tiny_state(
        2, poison="transformer.wpe.weight"
    )  # a row no batch reads: the loss stays finite
    assert checkpoints.save_checkpoint(log, bad, saved, last=False) == (saved, None)
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"error: {os.path.join(log, 'model_00002.pt')} is not written: its "
        "transformer.wpe.weight holds nan or inf; start again with a lower --max-lr"
    )
    assert f"continue from {saved}" in line
    kept, error = checkpoints.save_checkpoint(log, {**bad, "step": 3}, saved, last=True)
    assert (
        kept == saved and error.startswith("error: ") and "model_00003.pt is not written" in error
    )
    assert sorted(os.listdir(log)) == ["model_00001.pt"]


# --------------------------------------------------------------------------- 8: a CPU out of memory


def test_cpu_out_of_memory_in_a_step_is_one_line_in_the_log_too(run_args, tmp_path, monkeypatch):
    """The CPU allocator's RuntimeError ("can't allocate memory") gets the GPU's out-of-memory line,
    also in log.txt, not a traceback."""
    m = load(STAGE7)

    def next_batch(self):
        torch.empty(2**50)  # 4 PiB: the allocator's own error, as a too-big -B gives it

    monkeypatch.setattr(m.DataLoaderLite, "next_batch", next_batch)
    result, _, _ = quiet(m.main, [str(a) for a in run_args + ["--steps", "2"]])
    assert isinstance(result, SystemExit) and result.code == (
        "error: out of memory at -B 2 -T 32 on cpu; try -B 1 (same --total-batch-size: same run)"
    )
    assert (tmp_path / "log" / "log.txt").read_text().splitlines()[-1] == f"# {result.code}"


@pytest.mark.parametrize("name", SCRIPTS[2:7])  # stages 2-6
def test_cpu_out_of_memory_in_stages_2_to_6_is_one_line(name, monkeypatch):
    m = load(name)

    def forward(self, idx, targets=None):
        torch.empty(2**50)

    monkeypatch.setattr(m.GPT, "forward", forward)
    argv = TINY + ["--device", "cpu", "-B", "2", "-T", "16", "--steps", "1"]
    result, _, _ = quiet(m.main, argv)
    assert isinstance(result, SystemExit) and str(result.code).startswith(
        "error: out of memory at -B 2 -T 16 on cpu; try -B 1"
    ), result


# -------------------------------------------------------------------- 9: <|endoftext|> in input.txt


@pytest.mark.parametrize("name", SCRIPTS[2:7])  # stages 2-6
def test_an_input_with_gpt2s_separator_trains(name, tmp_path):
    """TinyStories, or any texts joined with <|endoftext|>: the separator is GPT-2's token 50256, no
    traceback."""
    text = tmp_path / "stories.txt"
    text.write_text("Once upon a time there was a cat.<|endoftext|>The end of a story. " * 20)
    tokens = load(name).load_tokens(str(text))
    assert (tokens == 50256).sum() == 20
    argv = TINY + [
        "--device",
        "cpu",
        "-B",
        "2",
        "-T",
        "16",
        "--steps",
        "1",
        "--input",
        text,
        "--num-return-sequences",
        "1",
        "--max-length",
        "9",
    ]
    _, rows = main_steps(load(name), argv)
    assert [r["step"] for r in rows] == [0]


# ---------------------------------------------------------------------------- 10: the tools' flags


@pytest.mark.parametrize(
    "tool, argv",
    [
        ("hellaswag", ["--limit", "1e3"]),
        ("fineweb", ["--shard-size", "1e6"]),
        ("plot_log", ["--smooth", "1e3"]),
        ("export_hf", []),
    ],
)
def test_a_tools_bad_flag_is_one_line(tool, argv):
    line = main_error(tool, argv)
    assert line.startswith("error: ") and (not argv or argv[0] in line), line


def test_gpu_checks_bad_flag_is_one_line():
    gpu_check = importlib.import_module("benchmarks.gpu_check")
    assert main_error(gpu_check, ["--budget-s", "1e"]).startswith("error: argument --budget-s")


# --------------------------------------------------------------------- 12: extending a finished run


def test_extending_a_finished_run_says_how_to_train_longer():
    """`--resume --steps 12` after a 6-step run: not "pass --steps 6 to continue it exactly" (which
    then says the run is finished): the run is finished, and a longer run is a new one in another
    log dir."""
    m = load(STAGE7)
    config = m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    run = {
        "seed": 1337,
        "max_lr": 6e-4,
        "warmup_steps": 10,
        "steps": 6,
        "total_batch_size": 256,
        "T": 32,
    }
    ckpt = {"config": asdict(config), "step": 6, "run": run, "loader": {"shards": []}}
    error = checkpoints.other_run(ckpt, "log/model_00006.pt", config, {**run, "steps": 12}, {})
    assert error == (
        "error: log/model_00006.pt: the run is finished (6 of 6 steps) and cannot be extended; to "
        "train longer, start a new run with a larger --steps in another --log-dir"
    )
    unfinished = checkpoints.other_run(
        {**ckpt, "step": 3}, "log/model_00003.pt", config, {**run, "steps": 12}, {}
    )
    assert "pass --steps 6 to continue it exactly" in unfinished


# -------------------------------------------------------------------- 14: an empty --hellaswag-file


def test_an_empty_hellaswag_file_is_named(tmp_path):
    """Stage 7 says in one line that HellaSwag is off and why (it was off silently); hellaswag.py
    stops with one line naming the file."""
    empty = tmp_path / "hellaswag_val.jsonl"
    empty.write_text("\n")
    m = load(STAGE7)
    args = SimpleNamespace(hellaswag_file=str(empty), hellaswag_limit=0)
    hella, out, _ = quiet(m.load_hellaswag, args, "cpu", print)
    assert hella is None and out.strip() == (
        f"HellaSwag is off for this run: {empty} holds no HellaSwag "
        "examples; pass the val split's file"
    )
    assert main_error("hellaswag", ["--data-file", empty]).startswith(
        f"error: {empty} holds no HellaSwag"
    )


# ---------------------------------------------------------------------- 17: a signal lost in set-up


def test_a_set_up_signal_whose_exit_is_swallowed_still_stops_the_run(run_args, monkeypatch):
    """The set-up handler raises SystemExit; raised inside code that swallows it (a __del__, a
    callback that ignores errors), it was lost and the run trained all its steps. It now ends the
    run before step 0."""
    m = load(STAGE7)
    load_hellaswag = m.load_hellaswag

    def swallowing(*args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while set-up is in such code
            time.sleep(1)  # the handler runs here
        except BaseException:
            pass
        return load_hellaswag(*args)

    monkeypatch.setattr(m, "load_hellaswag", swallowing)
    before = signal.getsignal(signal.SIGINT)
    result, out, err = quiet(m.main, [str(a) for a in run_args + ["--steps", "3"]])
    assert isinstance(result, SystemExit) and result.code == 128 + signal.SIGINT, (result, out)
    assert not parse_steps(out) and err.strip() == (
        "stopped by SIGINT during set-up; nothing was trained or " "saved"
    )
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="a FIFO holds the set-up (POSIX)")
def test_a_signal_during_set_up_ends_in_one_line(run_args, tmp_path):
    """Ctrl-C while set-up reads the shards: no race with a fast set-up, since a train shard that is
    a FIFO holds the run there (opening it waits for a writer) until the signal comes."""
    os.mkfifo(tmp_path / "shards" / "edufineweb_train_000009.npy")
    cmd = [sys.executable, str(ROOT / f"{STAGE7}.py")] + [str(a) for a in run_args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        head = [
            proc.stdout.readline(),
            proc.stdout.readline(),
        ]  # the last lines before the shards are read
        assert head[1].startswith("using device"), head
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (
        proc.returncode == 128 + signal.SIGINT and not parse_steps(out) and "Traceback" not in err
    ), err
    assert (
        err.strip().splitlines()[-1]
        == "stopped by SIGINT during set-up; nothing was trained or saved"
    )


# ----------------------------------------------------------------- 16: torchrun: set-up errors once


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["no shards", "a bad flag"])
def test_a_set_up_error_under_torchrun_is_printed_once(fault, tmp_path):
    """Every rank finds the same error: rank 0 prints it, the others exit 1 quietly (it was printed
    per rank)."""
    (tmp_path / "empty").mkdir()
    args = ["--data-dir", tmp_path / "empty"] if fault == "no shards" else ["--n-head", "0"]
    cmd = (
        TORCHRUN
        + [f"{STAGE7}.py"]
        + [str(a) for a in RUN7 + args + ["--log-dir", tmp_path / "log"]]
    )
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        text=True,
        capture_output=True,
        timeout=300,
    )
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")
    ]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert ("no train shards" if fault == "no shards" else "--n-head") in errors[0]


# ---------------------------------------------------------------------- issue 27: a rank that hangs


def torchrun_worker(parent, local_rank):
    """The pid of torchrun's worker `local_rank` (read from each child's environment), or None."""
    for pid in map(int, open(f"/proc/{parent}/task/{parent}/children").read().split()):
        if f"LOCAL_RANK={local_rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(
            b"\0"
        ):
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/proc/self/task"), reason="finds torchrun's workers in /proc (Linux)"
)
def test_a_rank_that_hangs_ends_the_others_within_the_collective_timeout(run_args, tmp_path):
    """Rank 1 stops answering (SIGSTOP: alive, its sockets open, so nothing fails by itself): rank
    0's next collective times out after COLLECTIVE_TIMEOUT_S (the mechanism NCCL gets with
    TORCH_NCCL_BLOCKING_WAIT) and it stops with lost_rank's line. Without a timeout it waited 30
    minutes (gloo's default)."""
    cmd = TORCHRUN + [f"{STAGE7}.py"] + [str(a) for a in run_args + ["--steps", "1000"]]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", COLLECTIVE_TIMEOUT_S="5"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def kill_run():  # torchrun and its workers (which run in sessions of their own)
        try:
            pids = [torchrun_worker(proc.pid, rank) for rank in (0, 1)] + [proc.pid]
        except OSError:  # torchrun has ended
            pids = []
        for pid in filter(None, pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    bound = threading.Timer(150, kill_run)  # every wait below ends by then
    bound.start()
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        worker = torchrun_worker(proc.pid, 1)
        os.kill(worker, signal.SIGSTOP)
        stopped, lines = time.time(), []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("error: step "):
                break
        waited = time.time() - stopped
        os.kill(worker, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        bound.cancel()
        if proc.poll() is None:
            kill_run()
    lost = [line for line in lines if line.startswith("error: step ")]
    assert lost and "another rank stopped answering; this rank stops too, " in lost[0], "".join(
        lines
    )
    assert waited < 60, waited


# ---------------------------------------------------------------- issue 27: a checkpoint's val step


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_a_checkpoint_records_the_step_its_val_loss_was_measured_at(run_args, tmp_path):
    """val_loss is of the state after val_step steps, up to --eval-every - 1 steps older than the
    weights."""
    m = load(STAGE7)
    out, rows = main_steps(
        m, run_args + ["--steps", "3", "--eval-every", "2", "--checkpoint-every", "1"]
    )
    vals = [
        float(line.split()[-1]) for line in out.splitlines() if line.startswith("validation loss")
    ]
    saved = [
        torch.load(tmp_path / "log" / f"model_{n:05d}.pt", weights_only=True) for n in (1, 2, 3)
    ]
    assert [(c["step"], c["val_step"]) for c in saved] == [(1, 0), (2, 0), (3, 2)]
    assert [round(c["val_loss"], 4) for c in saved] == [vals[0], vals[0], vals[1]]
