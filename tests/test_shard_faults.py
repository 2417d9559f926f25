"""Stage 7's shards when they are not what the run expects (issue 28's data cases): other tokens under
the same names on --resume, all-zero shards, tails a step skips, a shard cut short under the run, a val
shard at a large -B, a --data-dir without train shards. In process and fast, but for the cut-short shard,
whose SIGBUS would take pytest down with it."""
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import ROOT, RUN7, STAGE7, load, main_error, main_losses, write_shards

import longrun

SIZES = [3001, 5003, 4099]


def run_args(tmp_path, shards, *extra):
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    return RUN7 + ["--data-dir", shards, "--hellaswag-file", tmp_path / "no_hellaswag.jsonl",
                   "--log-dir", tmp_path / "log", *extra]


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_resume_on_other_tokens_of_the_same_names_and_sizes_is_refused(tmp_path, capsys):
    """Case 1: the same names and sizes, other tokens: refused in one line naming the shards, nothing
    appended; on the data it trained on, it continues with the uninterrupted run's losses."""
    m = load(STAGE7)
    ours, other = write_shards(tmp_path / "ours", SIZES), write_shards(tmp_path / "other", SIZES, seed=1)
    _, _, full = main_losses(m, run_args(tmp_path, ours, "--steps", "4", "--checkpoint-every", "2"))
    (tmp_path / "log" / "model_00004.pt").unlink()
    log = (tmp_path / "log" / "log.txt").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        m.main([str(a) for a in run_args(tmp_path, other, "--steps", "4", "--resume")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: ") and "other tokens" in err[0] and "edufineweb_train_000001.npy" in err[0]
    assert "pass the --data-dir it trained on" in err[0]
    assert (tmp_path / "log" / "log.txt").read_text() == log and not (tmp_path / "log" / "model_00004.pt").exists()
    _, rows, losses = main_losses(m, run_args(tmp_path, ours, "--steps", "4", "--resume"))
    assert [r["step"] for r in rows] == [2, 3] and losses == full[2:]


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_resume_of_a_checkpoint_without_digests_says_so(tmp_path, capsys):
    """Case 1, an older checkpoint (train shards recorded by name and size only): one note says what it
    does not record, and the run goes on."""
    m = load(STAGE7)
    ours = write_shards(tmp_path / "ours", SIZES)
    main_losses(m, run_args(tmp_path, ours, "--steps", "2", "--checkpoint-every", "1"))
    path = tmp_path / "log" / "model_00001.pt"
    (tmp_path / "log" / "model_00002.pt").unlink()
    ckpt = torch.load(path, weights_only=True)
    assert all(len(entry) == 3 for entry in ckpt["loader"]["shards"])  # name, size, digest
    ckpt["loader"]["shards"] = [entry[:2] for entry in ckpt["loader"]["shards"]]
    torch.save(ckpt, path)
    out, rows, _ = main_losses(m, run_args(tmp_path, ours, "--steps", "2", "--resume"))
    assert f"note: {path} does not record the train shards' contents;" in out and [r["step"] for r in rows] == [1]


def test_an_all_zero_train_shard_is_refused(tmp_path):
    """Case 2: a shard of zeros (a failed conversion) stops the run before it trains, naming the shard."""
    shards = write_shards(tmp_path / "shards", SIZES)
    bad = shards / "edufineweb_train_000002.npy"
    np.save(bad, np.zeros(4099, dtype=np.uint16))
    line = main_error(STAGE7, run_args(tmp_path, shards, "--steps", "1"))
    assert str(bad) in line and "only zeros" in line and "fineweb.py" in line
    assert not (tmp_path / "log").exists()


def test_the_tokens_an_epoch_skips_are_said_at_the_start(tmp_path, capsys):
    """Case 5: docs/data.md's --shard-size 1000000 at the default 524,288-token step: 47.6 % of each
    shard is never read (a step never spans two shards), and rank 0 says so at the start; the lecture's
    100M-token shards (0.38 %) get no note."""
    shards = write_shards(tmp_path / "shards", [3001, 1_000_000, 1_000_000])
    load(STAGE7).DataLoaderLite(str(shards), "train", 64, 1024, 0, 1, 0, 524288)
    out = capsys.readouterr().out
    assert out.startswith("note: each epoch skips 951,422 of the 2,000,000 train tokens (47.6 %)"), out
    load(STAGE7).DataLoaderLite(str(shards), "train", 64, 1024, 1, 2, 0, 524288)  # rank 1: silent
    longrun.note_skipped_tokens([100_000_000] * 99, 524288)
    assert capsys.readouterr().out == ""


CUT_SHORT = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
m = __import__("{STAGE7}")
loader = m.DataLoaderLite(sys.argv[1], "train", 2, 32, 0, 1, 0, 256)
loader.next_batch()
path = loader.shards[loader.order[loader.shard]]
os.truncate(path, 0)  # cut short in place while the run reads it
try:
    for _ in range(400):  # past the end of the epoch (136 batches): the shard is opened again
        loader.next_batch()
except m.ShardError as e:
    print(f"error: {{e}}")
"""


@pytest.mark.slow  # 400 batches
def test_a_shard_cut_short_under_the_run_is_one_line(tmp_path):
    """Case 7: a shard truncated in place while the run reads it: no SIGBUS (the batches come from a
    copy in memory), and the damaged-shard line when the shard is opened again."""
    shards = write_shards(tmp_path / "shards", SIZES)
    proc = subprocess.run([sys.executable, "-c", CUT_SHORT, str(shards)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("error: ") and "edufineweb_train_" in last and "is not a shard fineweb.py wrote" in last


def test_a_large_b_validates_on_a_val_shard_of_one_row(tmp_path):
    """Case 11: -B 200 at the same total batch as -B 2: validation needs one row of T + 1 tokens, not a
    step; the val loss is the same at either -B. A val shard shorter than a row says so."""
    m = load(STAGE7)
    shards = write_shards(tmp_path / "shards", [3001, 20000])
    val = m.DataLoaderLite(str(shards), "val", 200, 32, 0, 1)
    torch.manual_seed(0)
    model = m.GPT(m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    at = {B: m.val_loss(model, val.tokens, B, 32, 256, "cpu", nullcontext()) for B in (2, 200)}
    assert at[200] == pytest.approx(at[2], rel=1e-5)
    np.save(shards / "edufineweb_val_000000.npy", np.arange(1, 33, dtype=np.uint16))
    with pytest.raises(m.ShardError, match="shorter than a row of -T 32 plus a target"):
        m.DataLoaderLite(str(shards), "val", 200, 32, 0, 1)


def test_a_data_dir_without_train_shards_gives_its_advice_once(tmp_path):
    """Case 15: one line, each piece of advice once."""
    (tmp_path / "shards").mkdir()
    line = main_error(STAGE7, run_args(tmp_path, tmp_path / "shards"))
    assert "holds no train shards" in line and line.count("fineweb.py") == 1 and line.count("--data-dir") == 1
