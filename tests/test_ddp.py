"""Stage 7: shard loader, DDP equivalence, exact resume, checkpoints, log, bad input, signals."""
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, RUN7 as RUN, STAGE7 as NAME, assert_clean_error, load, make_examples, parse_steps, run7,
                      run_here, run_script, signal_run, write_jsonl, write_shards)


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", [3001, 5003, 4099, 6007, 2999])


# ---------------------------------------------------------------------------- the shard loader


def loader(shards, rank=0, world=1, B=2, T=32, seed=0, split="train", step_tokens=None):
    return load(NAME).DataLoaderLite(str(shards), split, B, T, rank, world, seed, step_tokens)


def test_a_shard_is_checked_through_a_map_and_trained_on_as_a_uint16_copy(shards):
    """The start-up check maps each shard (its header only); the loader trains on a copy in memory, which a
    file cut short under the run cannot change (a map would die with SIGBUS), kept uint16 (the lecture: int64)."""
    path = str(shards / "edufineweb_train_000001.npy")
    mapped, whole = load(NAME).load_tokens(path), load(NAME).load_tokens(path, whole=True)
    assert isinstance(mapped, np.memmap) and not isinstance(whole, np.memmap)
    assert whole.dtype == np.uint16 and np.array_equal(whole, mapped)
    assert not isinstance(loader(shards).tokens, np.memmap)  # what the run trains on


def test_ranks_are_dealt_round_robin_slices_of_one_process(shards):
    """W ranks cover exactly the slices that one process takes with W x the micro-steps."""
    step_tokens = 4 * 2 * 32  # a step of 4 slices: 4 micro-steps on 1 rank, 2 on each of 2 ranks
    single = loader(shards, world=1, step_tokens=step_tokens)
    ranks = [loader(shards, rank=r, world=2, step_tokens=step_tokens) for r in range(2)]
    for _ in range(150):  # several shards and an epoch boundary
        for r in range(2):
            x, y = ranks[r].next_batch()
            x1, y1 = single.next_batch()
            torch.testing.assert_close(x, x1)
            torch.testing.assert_close(y, y1)
            torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1])  # targets: shifted by 1
    assert ranks[0].epoch == ranks[1].epoch == single.epoch >= 1


def test_rank_balance_on_odd_sized_shards(shards):
    """Every rank takes the same number of batches from each shard (the lecture's ranks drift)."""
    W, B, T, accum = 3, 2, 16, 2
    step_tokens = W * B * T * accum
    ranks = [loader(shards, rank=r, world=W, B=B, T=T, step_tokens=step_tokens) for r in range(W)]
    counts = [{}, {}, {}]
    while ranks[0].epoch == 0 or ranks[0].position == 0:
        for r in range(W):
            ranks[r].next_batch()
            key = (ranks[r].epoch, ranks[r].shards[ranks[r].order[ranks[r].shard]])
            counts[r][key] = counts[r].get(key, 0) + 1
    assert counts[0] == counts[1] == counts[2]
    sizes = {str(p): len(np.load(p, mmap_mode="r")) for p in ranks[0].shards}  # 5003, 4099, 6007, 2999
    assert {path: n for (epoch, path), n in counts[0].items() if epoch == 0} == {
        path: (size - 1) // step_tokens * accum for path, size in sizes.items()}


def test_shuffle_per_epoch(shards):
    a0, a1 = loader(shards, rank=0, world=2, seed=5), loader(shards, rank=1, world=2, seed=5)
    orders = [a0.shard_order(e) for e in range(6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # the order changes between epochs
    assert orders == [a1.shard_order(e) for e in range(6)]  # the same on every rank
    assert orders == [loader(shards, seed=5).shard_order(e) for e in range(6)]  # repeatable
    assert orders != [loader(shards, seed=6).shard_order(e) for e in range(6)]  # seeded
    val = loader(shards, split="val")
    assert val.shard_order(3) == [0]  # val is never shuffled


# ---------------------------------------------------------------------------- training runs


def test_checkpoint_contents(straight):
    """What a checkpoint holds (plain types only), and what makes it this run. (A 2-rank run's checkpoint,
    whose keys must not carry DDP's `module.` prefix, is checked in test_pipeline_fineweb_to_ddp_to_stage1.)"""
    ckpt = torch.load(straight[2] / "model_00006.pt", weights_only=True)  # plain types only
    assert ckpt["step"] == 6 and ckpt["config"] == {"block_size": 1024, "vocab_size": 50304, "n_layer": 2,
                                                    "n_head": 2, "n_embd": 32}
    assert isinstance(ckpt["val_loss"], float) and set(ckpt["loader"]) == {"epoch", "shard", "position", "shards"}
    # what makes it this run: the train shards (name, size, digest) and the flags that decide the run
    assert [s[:2] for s in ckpt["loader"]["shards"]] == [[f"edufineweb_train_{i:06d}.npy", n] for i, n in
                                                         zip(range(1, 5), [5003, 4099, 6007, 2999])]
    assert ckpt["run"] == {"seed": 1337, "max_lr": 6e-4, "warmup_steps": 10, "steps": 6, "total_batch_size": 256,
                           "T": 32}
    assert not [k for k in ckpt["model"] if k.startswith(("module.", "_orig_mod."))]
    assert "state" in ckpt["optimizer"] and "cpu" in ckpt["rng"]
    assert not list(straight[2].glob("*.tmp"))


def test_log_file(shards, tmp_path):
    run7("--data-dir", shards, "--log-dir", tmp_path, "--steps", "3", "--eval-every", "2")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    header = [l for l in lines if l.startswith("#")]
    assert header[0].startswith("# command: ") and "torch " in header[1] and "device" in header[2]
    body = [l.split() for l in lines if not l.startswith("#")]
    assert [(int(s), kind) for s, kind, _ in body] == [(0, "val"), (0, "train"), (1, "train"), (2, "val"),
                                                        (2, "train")]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.slow  # imports `datasets`
def test_offline_without_hellaswag_file_says_so_once_and_trains_on(shards, tmp_path, monkeypatch):
    """Offline (conftest sets HF_HUB_OFFLINE=1 before `datasets` is imported) with an empty `datasets`
    cache: one line naming the hub dataset and the flag. The real `datasets` answers, in this process;
    test_hellaswag's offline tests start a fresh interpreter with an empty HF_HOME."""
    import hellaswag
    empty = str(tmp_path / "datasets_cache")
    hub_rows = hellaswag.hub_rows
    monkeypatch.setattr(hellaswag, "hub_rows", lambda split, cache_dir=None: hub_rows(split, empty))
    proc = run_here(NAME, *RUN, "--data-dir", shards, "--log-dir", tmp_path / "log", "--steps", "2",
                    "--eval-every", "1")
    assert proc.returncode == 0, proc.stderr
    off = [line for line in proc.stdout.splitlines() if "HellaSwag is off for this run" in line]
    assert len(off) == 1 and "Rowan/hellaswag" in off[0] and "--hellaswag-file" in off[0], proc.stdout
    assert [r["step"] for r in parse_steps(proc.stdout)] == [0, 1]
    assert {kind for _, kind, _ in log_entries(tmp_path / "log")} == {"train", "val"}


def test_no_shards(tmp_path):
    proc = run_here(NAME, *RUN, "--data-dir", tmp_path, "--log-dir", tmp_path / "log")
    assert_clean_error(proc, "no train shards", "fineweb.py")


def test_shard_of_wrong_dtype(shards, tmp_path):
    np.save(shards / "edufineweb_train_000009.npy", np.arange(5000, dtype=np.int32))
    proc = run_here(NAME, *RUN, "--data-dir", shards, "--log-dir", tmp_path / "log")
    assert_clean_error(proc, "edufineweb_train_000009.npy", "int32", "uint16")


def test_total_batch_not_divisible_by_ranks(shards, tmp_path, monkeypatch):
    """The check made before any collective, with the world size torchrun would give (2 ranks)."""
    m = load(NAME)
    monkeypatch.setattr(m, "setup_ddp", lambda device: (False, 0, 0, 2, "cpu"))
    proc = run_here(m, *RUN, "--total-batch-size", "192", "--data-dir", shards, "--log-dir", tmp_path / "log")
    assert_clean_error(proc, "--total-batch-size 192 is not a positive multiple of B*T*ranks = 128")
    assert not (tmp_path / "log").exists()


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_resume_into_an_empty_log_dir_starts_fresh(shards, tmp_path):
    """So that `torchrun --max-restarts N ... --resume` can start the run as well as restart it."""
    proc, rows = run7("--data-dir", shards, "--log-dir", tmp_path / "log", "--steps", "2", "--resume")
    assert f"--resume: no checkpoint in {tmp_path / 'log'} yet; starting a fresh run" in proc.stdout
    assert [r["step"] for r in rows] == [0, 1] and (tmp_path / "log" / "model_00002.pt").exists()


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_resume_with_other_model_size(shards, tmp_path):
    run7("--data-dir", shards, "--log-dir", tmp_path, "--steps", "1")
    proc = run_here(NAME, *RUN, "--n-embd", "64", "--data-dir", shards, "--log-dir", tmp_path, "--resume")
    assert_clean_error(proc, "model_00001.pt", "--n-embd")


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_fresh_run_keeps_an_earlier_runs_log_and_checkpoints(shards, tmp_path):
    log = tmp_path / "log"
    run7("--data-dir", shards, "--log-dir", log, "--steps", "1")
    before = {p.name: p.read_bytes() for p in log.iterdir()}
    proc = run_here(NAME, *RUN, "--data-dir", shards, "--log-dir", log, "--steps", "1")
    assert_clean_error(proc, "holds an earlier run (model_00001.pt)", "--resume")
    assert {p.name: p.read_bytes() for p in log.iterdir()} == before  # nothing overwritten, no lock left
    (log / "model_00001.pt").unlink()  # a dir with only an old log.txt: refused too
    proc = run_here(NAME, *RUN, "--data-dir", shards, "--log-dir", log, "--steps", "1")
    assert_clean_error(proc, "holds an earlier run (log.txt)", "--resume")
    assert sorted(p.name for p in log.iterdir()) == ["log.txt"] and (log / "log.txt").read_bytes() == before["log.txt"]


# ---------------------------------------------------------------------------- evaluation and the pipeline


def reference_hellaswag(examples):
    """acc_norm of stage 7's freshly initialised tiny model (seed 1337), scored in the test."""
    import hellaswag
    m = load(NAME)
    torch.manual_seed(1337)
    model = m.GPT(m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    n, _, correct_norm = hellaswag.evaluate(lambda idx: model(idx)[0][..., :50257], examples, batch_size=3)  # as -m does
    return correct_norm / n


def log_entries(log_dir):
    rows = [line.split() for line in (log_dir / "log.txt").read_text().splitlines() if not line.startswith("#")]
    return [(int(step), kind, float(value)) for step, kind, value in rows]


@pytest.mark.slow
def test_eval_and_sampling_with_torch_compile(shards, tmp_path):
    """The lecture's run has compile off (it broke HellaSwag and sampling). Here a compiled run trains and
    evaluates: val loss through the compiled model, HellaSwag and samples through the uncompiled module."""
    examples = make_examples(10)
    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", examples)
    proc, rows = run7("--data-dir", shards, "--log-dir", tmp_path / "log", "--steps", "4", "--eval-every", "2",
                      "--compile", "--hellaswag-file", jsonl, "--hellaswag-limit", "0")
    assert "compile on" in proc.stdout and [r["step"] for r in rows] == [0, 1, 2, 3]
    assert proc.stdout.count("sample 0: Hello, I'm a language model,") == 2  # at step 2 and the last
    entries = log_entries(tmp_path / "log")
    assert [(s, k) for s, k, _ in entries if k != "train"] == [(0, "val"), (0, "hella"), (2, "val"), (2, "hella"),
                                                              (3, "val"), (3, "hella")]
    assert entries[1][2] == pytest.approx(reference_hellaswag(examples), abs=1e-4)


@pytest.mark.slow
def test_pipeline_fineweb_to_ddp_to_stage1(tmp_path):
    """fineweb.py -> torchrun 2 processes of 7_ -> log.txt -> the checkpoint in 1_'s GPT. The 2 ranks x 4
    micro-steps of -B 1 give the losses, gradient norms, val loss and HellaSwag of 1 process x 4 micro-steps of
    -B 2: the val set is --val-tokens (5 rows of T here) dealt across the ranks in batches of up to B rows (rank
    0 takes rows 0, 2, 4; with -B 2 one process takes 2 + 2 + 1), and each rank scores every other example."""
    import json
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()][:1500]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards = tmp_path / "shards"
    proc = run_script("fineweb", "--data-files", corpus, "--shard-size", "20000", "--out-dir", shards, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(list(shards.glob("edufineweb_train_*.npy"))) >= 3
    examples = make_examples(9)
    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", examples)
    args = ["--data-dir", shards, "--steps", "3", "--eval-every", "2", "--val-tokens", "160",
            "--hellaswag-file", jsonl, "--hellaswag-limit", "0"]
    _, one = run7(*args, "--log-dir", tmp_path / "one")
    proc, rows = run7(*args, "--log-dir", tmp_path / "log", "-B", "1", nproc=2)
    assert "4 micro-steps of B*T = 32 on each of 2 ranks" in proc.stdout and "DDP: 2 ranks, gloo" in proc.stdout
    assert proc.stdout.count("step     0 |") == 1  # only rank 0 prints
    assert [r["step"] for r in rows] == [0, 1, 2]
    for a, b in zip(one, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)
    entries, single = log_entries(tmp_path / "log"), log_entries(tmp_path / "one")
    assert [(s, k) for s, k, _ in entries] == [(s, k) for s, k, _ in single]
    for (_, kind, a), (_, _, b) in zip(entries, single):
        assert a == pytest.approx(b, abs=2e-4 if kind == "val" else 1e-5)  # val: printed to 4 decimals
    # each rank scored every other example; the summed counts give the whole set's accuracy
    assert [v for s, k, v in entries if k == "hella"][0] == pytest.approx(reference_hellaswag(examples), abs=1e-4)

    ckpt = torch.load(tmp_path / "log" / "model_00003.pt", weights_only=True)
    assert ckpt["step"] == 3 and not [k for k in ckpt["model"] if k.startswith(("module.", "_orig_mod."))]
    stage1, stage7 = load("1_gpt2_hf_eval"), load(NAME)
    ours = stage7.GPT(stage7.GPTConfig(**ckpt["config"])).eval()
    ours.load_state_dict(ckpt["model"])
    theirs = stage1.GPT(stage1.GPTConfig(**ckpt["config"])).eval()
    theirs.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx)[0], ours(idx)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- signals, damaged and unwritable checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (2, signal.SIGTERM)])
def test_signal_saves_the_step_and_resume_goes_on_exactly(straight, tmp_path, nproc, sig):
    """SIGTERM mid-run: the step in progress finishes, all ranks stop after it, its checkpoint is written,
    the printed command resumes it, and the losses equal the uninterrupted run's. (Ctrl-C takes the same
    handler and save: test_ctrl_c_under_torchrun_... and test_second_ctrl_c_... check its stop.)"""
    data, full, _ = straight
    log = tmp_path / "log"
    proc = signal_run(data + ["--log-dir", log], [sig], nproc=nproc)
    done = parse_steps(proc.stdout)
    n = len(done)  # steps 0 .. n-1 ran; the signal came during step 0 or 1
    assert 1 <= n < 6, proc.stdout + proc.stderr
    assert f'{NAME}.py", line' not in proc.stderr  # no traceback on any rank
    if nproc == 1:
        assert proc.returncode == 128 + sig  # as a shell reports a process the signal stopped
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", f"model_{n:05d}.pt"]  # one checkpoint, no .tmp
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"stopped after step {n - 1}; continue from {log / f'model_{n:05d}.pt'} with: "), proc.stdout
    command = shlex.split(last.split(" with: ", 1)[1])
    assert command[0] == ("torchrun" if nproc == 2 else "python") and command.count("--resume") == 1
    if nproc == 1:  # the printed `python 7_...py ARGS` in this process: the same numbers, no start-up
        assert command[1].endswith(f"{NAME}.py")
        resumed = run_here(NAME, *command[2:])
    else:  # torchrun through this Python: it need not be on PATH
        resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + command[1:], cwd=ROOT,
                                 capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = done + parse_steps(resumed.stdout)
    assert [r["step"] for r in rows] == list(range(6))
    for a, b in zip(rows, full):  # the same process count gives the same numbers; 2 ranks agree to 1e-5
        assert a["loss"] == pytest.approx(b["loss"], rel=0 if nproc == 1 else 1e-5)
        assert a["norm"] == pytest.approx(b["norm"], rel=0 if nproc == 1 else 1e-5)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tmp_path):
    """Ctrl-C, then Ctrl-C again before the step ends: the run ends at once, without a checkpoint."""
    shards = write_shards(tmp_path / "shards", [1000, 20000])  # one shard holds a step of 8,192 tokens
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    log = tmp_path / "log"
    # 128 micro-steps per step (~2 s on 2 idle cores): both Ctrl-Cs (0.3 s and 0.5 s after step 0's line) land
    # in step 1, and 0.2 s between them outlasts one tensor op, after which the first Ctrl-C's handler has run
    proc = signal_run(["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--steps", "3",
                       "--log-dir", log, "--total-batch-size", "8192"], [signal.SIGINT, signal.SIGINT], pause=0.2,
                      delay=0.3)
    assert proc.returncode == -signal.SIGINT, proc.stdout + proc.stderr  # killed by the second one
    assert len(parse_steps(proc.stdout)) == 1 and "stopped after" not in proc.stdout
    assert sorted(p.name for p in log.iterdir()) == ["lock", "log.txt"]  # its lock stays, as after kill -9
    # ... and does not block the next run: its holder is gone
    proc, rows = run7("--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--steps", "1",
                      "--log-dir", log, "--resume")
    assert len(rows) == 1 and "in use" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_00001.pt"]


def test_exact_resume_past_a_damaged_newest_checkpoint(straight, tmp_path):
    """N steps straight, vs --resume from the N/2 checkpoint: the same second half, to the bit. Here the newest
    checkpoint, N, is cut short (an interrupted copy): one line names it and what to do, nothing deleted or
    rewritten; doing what it says resumes from N/2, whose first printed step is N/2, and appends to log.txt."""
    data, full, straight_log = straight
    log = tmp_path / "log"
    log.mkdir()
    for name in ("model_00003.pt", "model_00006.pt"):
        (log / name).write_bytes((straight_log / name).read_bytes())
    (log / "log.txt").write_text("# the first half's log\n")
    newest = log / "model_00006.pt"
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])  # an interrupted copy
    before = {p.name: p.read_bytes() for p in log.iterdir()}
    proc = run_here(NAME, *RUN, *data, "--log-dir", log, "--resume")
    assert_clean_error(proc, str(newest), "move it out of", "--resume")
    assert {p.name: p.read_bytes() for p in log.iterdir()} == before
    newest.rename(tmp_path / "model_00006.pt.damaged")
    proc, rows = run7(*data, "--log-dir", log, "--resume")
    assert f"resuming from {log / 'model_00003.pt'}" in proc.stdout and [r["step"] for r in rows] == [3, 4, 5]
    assert rows == [{**r, "dt": s["dt"], "tok/s": s["tok/s"]} for r, s in zip(full[3:], rows)]
    text = (log / "log.txt").read_text()
    assert text.startswith("# the first half's log\n") and "# resumed at step 3" in text  # appended


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_failed_checkpoint_write_keeps_the_earlier_ones(shards, tmp_path):
    """A checkpoint whose write fails like on a full disk (its .tmp is /dev/full: ENOSPC): one line
    says so, the partial .tmp is removed, the earlier checkpoint is kept, and training goes on."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "model_00002.pt.tmp").symlink_to("/dev/full")
    proc, rows = run7("--data-dir", shards, "--log-dir", log, "--steps", "3", "--checkpoint-every", "1")
    errors = [line for line in proc.stderr.splitlines() if "model_00002.pt" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write {log / 'model_00002.pt'}")
    assert "Traceback" not in proc.stderr and [r["step"] for r in rows] == [0, 1, 2]
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_00001.pt", "model_00003.pt"]
    assert [torch.load(log / f"model_{n:05d}.pt", weights_only=True)["step"] for n in (1, 3)] == [1, 3]


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_in_run_hellaswag_scores_the_real_logits_as_hellaswag_py_does(shards, tmp_path, checkpoint):
    """Stage 7's own HellaSwag figure equals `hellaswag.py -m` on the same weights: both score the
    first 50,257 logits. The checkpoint's padding rows are large, so scoring all 50,304 differs."""
    import hellaswag
    examples = make_examples(12)
    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", examples)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "model_00004.pt").write_bytes(checkpoint[0].read_bytes())
    run7("--data-dir", shards, "--log-dir", log_dir, "--steps", "5", "--resume",  # step 4 is the last: eval
         "--hellaswag-file", jsonl, "--hellaswag-limit", "0")
    logged = [v for s, k, v in log_entries(log_dir) if k == "hella"]
    model = checkpoint[1]
    n, _, sliced = hellaswag.evaluate(lambda idx: model(idx)[0][..., :50257], examples, batch_size=4)
    _, _, padded = hellaswag.evaluate(lambda idx: model(idx)[0], examples, batch_size=4)
    assert sliced != padded and logged == [pytest.approx(sliced / n, abs=1e-4)]
