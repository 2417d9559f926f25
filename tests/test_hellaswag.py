"""hellaswag.py: rendering, completion-style scoring (acc vs acc_norm), batching, CLI, data sources.

The reference everywhere is the plain loop: for each ending, run context + ending through the
model on its own and take the summed / mean cross-entropy of the ending's tokens.
"""
import math
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

import hellaswag
from conftest import assert_clean_error, make_examples, run_script, write_hub_format, write_jsonl

RESULT = re.compile(r"^acc (\d\.\d{4}) acc_norm (\d\.\d{4}) over (\d+) examples$", re.M)


@pytest.fixture(scope="module")
def model(hf_dir):
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def reference(model, examples, enc):
    """(label, pred, pred_norm) per example from the plain per-ending loop."""
    out = []
    for ex in examples:
        ctx = enc.encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + end])).logits[0]      # (len(ctx+end), V)
            # the logits at the last context position predict the first ending token, etc.
            losses = F.cross_entropy(logits[len(ctx) - 1:-1], torch.tensor(end), reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        out.append((ex["label"], sums.index(min(sums)), means.index(min(means))))
    return out


def counts(preds):
    return (len(preds), sum(p == lab for lab, p, _ in preds), sum(p == lab for lab, _, p in preds))


def test_render_example(enc):
    ex = {"ctx": "A man is sitting on a roof. He", "label": 3,
          "endings": ["starts pulling up roofing on a roof.",
                      "is using wrap to wrap a pair of skis.",
                      "is ripping level tiles off.", "is holding a rubik's cube."]}
    data, tokens, mask, label = hellaswag.render_example(ex, enc)
    ctx = enc.encode(ex["ctx"])
    rows = [ctx + enc.encode(" " + e) for e in ex["endings"]]
    assert label == data["label"] == 3 and data["ctx_tokens"] == ctx
    assert tokens.dtype == torch.long and tokens.shape == mask.shape == (4, max(map(len, rows)))
    for i, row in enumerate(rows):
        assert tokens[i, :len(row)].tolist() == row
        assert tokens[i, len(row):].eq(0).all()                          # right-padded with 0
        assert mask[i].tolist() == [0] * len(ctx) + [1] * (len(row) - len(ctx)) + \
            [0] * (tokens.size(1) - len(row))                            # 1 exactly on the ending
        assert data["ending_tokens"][i] == enc.encode(" " + ex["endings"][i])
    assert enc.encode(" " + ex["endings"][0])[0] != enc.encode(ex["endings"][0])[0]  # space counts
    default = hellaswag.render_example(ex)                               # lazily-made gpt2 encoder
    assert default[1].equal(tokens) and default[2].equal(mask)


def test_sum_vs_mean_loss_on_handmade_logits():
    """Losses known in closed form: row 0 has a 1-token ending at loss ln 4 (sum 1.39, mean
    1.39); row 1 a 4-token ending at log(e+3)-1 ≈ 0.74 each (sum 2.97, mean 0.74). acc must pick
    row 0, acc_norm row 1. Context and padding positions carry huge losses that must not count."""
    V, L = 4, 6
    tokens = torch.tensor([[1, 2, 3, 0, 0, 0],     # ctx = 2 tokens, ending = 1 token, 3 padding
                           [1, 2, 3, 1, 2, 3],     # ctx = 2 tokens, ending = 4 tokens
                           [1, 2, 3, 1, 0, 0],
                           [1, 2, 3, 1, 2, 0]])
    ends = [1, 4, 2, 3]
    mask = torch.zeros(4, L, dtype=torch.long)
    for r, e in enumerate(ends):
        mask[r, 2:2 + e] = 1
    logits = torch.zeros(4, L, V)
    for r in range(4):
        for t in range(L - 1):                   # position t predicts token t+1 ...
            logits[r, t, tokens[r, t + 1]] = -50.0   # ... and by default costs ≈ 50 nats
    logits[0, 1] = 0.0                           # row 0's ending token: uniform, ln 4
    logits[1, 1:5] = 0.0
    logits[1, torch.arange(1, 5), tokens[1, 2:6]] = 1.0   # row 1's: log(e + 3) - 1 each
    sum_loss, mean_loss = hellaswag.row_losses(tokens, mask, logits)
    per_tok = math.log(math.e + 3) - 1
    assert sum_loss[:2].tolist() == pytest.approx([math.log(4), 4 * per_tok], rel=1e-5)
    assert mean_loss[:2].tolist() == pytest.approx([math.log(4), per_tok], rel=1e-5)
    assert hellaswag.score_rows(tokens, mask, logits) == (0, 1)
    assert hellaswag.get_most_likely_row(tokens, mask, logits) == 1
    # bf16 logits (autocast in training) are scored in float32: same picks, float32 losses
    half = logits.bfloat16()
    assert hellaswag.score_rows(tokens, mask, half) == (0, 1)
    sum_half, _ = hellaswag.row_losses(tokens, mask, half)
    assert sum_half.dtype == torch.float32
    assert sum_half.equal(hellaswag.row_losses(tokens, mask, half.float())[0])


def test_counts_match_reference_loop(model, examples, reference):
    fn = lambda idx: model(idx).logits
    preds = list(hellaswag.predictions(fn, examples, batch_size=1))
    assert preds == reference
    assert hellaswag.evaluate(fn, examples, batch_size=1) == counts(reference)
    assert any(p != q for _, p, q in reference)  # acc and acc_norm disagree somewhere


def test_get_most_likely_row_matches_reference(model, examples, reference):
    for ex, (label, _, pred_norm) in zip(examples, reference):
        _, tokens, mask, lab = hellaswag.render_example(ex)
        with torch.no_grad():
            logits = model(tokens).logits
        assert lab == label and hellaswag.get_most_likely_row(tokens, mask, logits) == pred_norm


def test_batched_equals_unbatched(model, examples, reference):
    fn = lambda idx: model(idx).logits
    batched = list(hellaswag.predictions(fn, examples, batch_size=5))    # batches of 5, 5, 2
    assert batched == reference
    assert hellaswag.evaluate(fn, iter(examples), batch_size=5) == counts(reference)


def test_cli_local_model_and_file(hf_dir, examples, reference, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    out = run_script("hellaswag", "-m", hf_dir, "-d", "cpu", "--data-file", data,
                     "--batch-size", 5, "--log-every", 4)
    assert out.returncode == 0, out.stderr
    n, acc, acc_norm = counts(reference)
    assert RESULT.search(out.stdout).groups() == (f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))
    assert len(re.findall(r"^\s+\d+ examples \| acc ", out.stdout, re.M)) == 3   # at 4, 8, 12

    limited = run_script("hellaswag", "-m", hf_dir, "-d", "cpu", "--data-file", data, "--limit", 5)
    n, acc, acc_norm = counts(reference[:5])
    assert RESULT.search(limited.stdout).groups() == (f"{acc / n:.4f}", f"{acc_norm / n:.4f}", "5")


def test_cli_offline_hub_name(examples, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    out = run_script("hellaswag", "-m", "gpt2", "--data-file", data, "-d", "cpu",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "'gpt2'" in out.stderr


# ---------------------------------------------------------------------------- data sources


def test_import_does_not_import_datasets():
    """Stage 7 imports hellaswag.py, and some GPU images have no `datasets`."""
    code = "import sys, hellaswag; assert 'datasets' not in sys.modules, 'datasets imported'"
    proc = run_script("hellaswag", cmd=[sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def fake_datasets(monkeypatch, examples):
    """A stand-in `datasets` module whose load_dataset records its arguments and returns the
    examples in the hub's format (label a string)."""
    calls = []

    def load_dataset(path, split=None, cache_dir=None):
        calls.append((path, split, cache_dir))
        return [{**ex, "label": str(ex["label"])} for ex in examples]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_source_split_names_and_int_labels(fake_datasets, examples):
    assert list(hellaswag.iterate_examples("val")) == examples           # labels back to ints
    assert list(hellaswag.iterate_examples("train", cache_dir="c")) == examples
    assert fake_datasets == [("Rowan/hellaswag", "validation", None), ("Rowan/hellaswag", "train", "c")]
    assert all(type(ex["label"]) is int for ex in hellaswag.iterate_examples("val"))


@pytest.mark.parametrize("name", ["original.jsonl", "hub.jsonl", "hub.parquet"])
def test_data_file_formats(name, examples, tmp_path):
    """The original jsonl (label an int) and the hub's format (label a string) as jsonl or
    parquet all give the same examples, labels as ints."""
    path = tmp_path / name
    (write_jsonl if name.startswith("original") else write_hub_format)(path, examples)
    if name.startswith("hub"):
        assert all(type(row["label"]) is str for row in hellaswag.file_rows(path))   # really the hub's
    assert list(hellaswag.iterate_examples(data_file=path)) == examples


def score(capsys, *argv):
    """hellaswag.py's main in this process: (acc, acc_norm, n) as it prints them."""
    hellaswag.main([str(a) for a in argv])
    return RESULT.search(capsys.readouterr().out).groups()


def test_cli_reads_hub_parquet(hf_dir, examples, reference, tmp_path, capsys):
    data = write_hub_format(tmp_path / "validation.parquet", examples)
    n, acc, acc_norm = counts(reference)
    assert score(capsys, "-m", hf_dir, "-d", "cpu", "--data-file", data, "--batch-size", 4) == (
        f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))


def test_offline_with_nothing_cached_is_one_line(tmp_path):
    """The real `datasets`, offline, with an empty cache: one line naming the dataset and the flag."""
    out = run_script("hellaswag", "-m", "unused", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(out, "Rowan/hellaswag", "--data-file")
    assert len(out.stderr.strip().splitlines()) == 1


def test_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)                   # import datasets -> ImportError
    with pytest.raises(hellaswag.HellaSwagError, match=r"Rowan/hellaswag.*pip install datasets"):
        list(hellaswag.iterate_examples("val"))
    with pytest.raises(SystemExit) as exit_info:                         # the CLI adds the way out
        hellaswag.main(["-m", "unused"])
    assert str(exit_info.value.code).startswith("error: ") and "--data-file" in str(exit_info.value.code)


def test_hub_failure_becomes_hellaswag_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(hellaswag.HellaSwagError, match="hub dataset Rowan/hellaswag .*OfflineModeIsEnabled"):
        list(hellaswag.iterate_examples("val"))


@pytest.mark.parametrize("content, needle", [
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}\n{"ctx": "half', "line 2: not a JSON record"),
    ('{"text": "a FineWeb document, not HellaSwag"}\n', "example 0 is not a HellaSwag example"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": "1"}\n', "example 0 is not a HellaSwag example"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}\n', "example 0 is not a HellaSwag example"),
], ids=["cut-off", "not-hellaswag", "two-endings", "test-split-label"])
def test_bad_data_file_is_one_line(content, needle, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(hellaswag.HellaSwagError, match=re.escape(needle)):
        list(hellaswag.iterate_examples(data_file=path))
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-m", "unused", "--data-file", str(path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and needle in message and len(message.splitlines()) == 1


def test_not_parquet(tmp_path):
    path = tmp_path / "val.parquet"
    path.write_text("not parquet")
    with pytest.raises(hellaswag.HellaSwagError, match="not a parquet file"):
        list(hellaswag.iterate_examples(data_file=path))


# ---------------------------------------------------------------------------- a stage-7 checkpoint as -m


def test_checkpoint_scores_like_its_export(checkpoint, exported, examples, tmp_path, capsys):
    """-m log/model_N.pt scores our GPT on its first 50257 logits: the same acc / acc_norm as the
    exported GPT2LMHeadModel. The checkpoint's padding rows are large, so scoring all 50304
    logits would change the answers (checked here, so this test can fail)."""
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    ours = score(capsys, "-m", checkpoint[0], "-d", "cpu", "--data-file", data, "--batch-size", 4)
    theirs = score(capsys, "-m", exported, "-d", "cpu", "--data-file", data, "--batch-size", 4)
    assert ours == theirs
    model = checkpoint[1]
    sliced = hellaswag.evaluate(lambda idx: model(idx)[0][..., :50257], examples, batch_size=4)
    padded = hellaswag.evaluate(lambda idx: model(idx)[0], examples, batch_size=4)
    n, acc, acc_norm = sliced
    assert ours == (f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))
    assert padded != sliced


def test_bad_checkpoint_is_one_line(examples, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", examples[:2])
    path = tmp_path / "model_00004.pt"
    out = run_script("hellaswag", "-m", path, "-d", "cpu", "--data-file", data)   # missing
    assert_clean_error(out, "model_00004.pt", "no such checkpoint")
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-m", str(path), "-d", "cpu", "--data-file", str(data)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "model_00004.pt is not a checkpoint" in message
    assert len(message.splitlines()) == 1
