"""hellaswag.py: rendering, completion-style scoring (acc vs acc_norm), batching, CLI, data sources,
rows that are not examples, rows longer than the model's context, damaged weights.

The reference everywhere is the plain loop: for each ending, run context + ending through the
model on its own and take the summed / mean cross-entropy of the ending's tokens.
"""
import math
import os
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import (RUN7, STAGE7, assert_clean_error, load, main_error, main_steps, make_examples, run_here, run_script,
                      write_hub_format, write_jsonl, write_shards)

RESULT = re.compile(r"^acc (\d\.\d{4}) acc_norm (\d\.\d{4}) over (\d+) examples$", re.M)


@pytest.fixture(scope="module")
def model(hf_dir):
    from transformers import GPT2LMHeadModel  # here, not at the top: collecting the suite need not import it
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
    out = run_here("hellaswag", "-m", hf_dir, "-d", "cpu", "--data-file", data, "--batch-size", 5, "--log-every", 4)
    assert out.returncode == 0, out.stderr
    n, acc, acc_norm = counts(reference)
    assert RESULT.search(out.stdout).groups() == (f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))
    assert len(re.findall(r"^\s+\d+ examples \| acc ", out.stdout, re.M)) == 3   # at 4, 8, 12

    limited = run_here("hellaswag", "-m", hf_dir, "-d", "cpu", "--data-file", data, "--limit", 5)
    n, acc, acc_norm = counts(reference[:5])
    assert RESULT.search(limited.stdout).groups() == (f"{acc / n:.4f}", f"{acc_norm / n:.4f}", "5")


@pytest.mark.slow  # a fresh interpreter: the hub client reads HF_HOME when it is imported
def test_cli_offline_hub_name(examples, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    out = run_script("hellaswag", "-m", "gpt2", "--data-file", data, "-d", "cpu",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "'gpt2'" in out.stderr


# ---------------------------------------------------------------------------- data sources


@pytest.mark.slow  # a fresh interpreter
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


def test_an_unreachable_hub_means_the_cache_at_once(fake_datasets, monkeypatch):
    """Offline without HF_HUB_OFFLINE, the hub clients retry for ~25 s before reading their cache (every
    stage-7 start, on every rank): a connection refused at once tells them first, through the variable
    they read when imported and the setting of a client imported already."""
    import socket

    import huggingface_hub.constants
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    tried = []

    def refused(address, timeout):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refused)
    assert list(hellaswag.iterate_examples("val")) and tried == [("huggingface.co", 443)]
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert hellaswag.hub_reachable() and len(tried) == 1  # behind a proxy: no direct route to try


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


@pytest.mark.slow  # a fresh interpreter: `datasets` reads HF_HOME when it is imported
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


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size 0 is out of range"), (["--limit", "-1"], "--limit -1 is out of range"),
    (["--limit", "0"], "--limit 0 is out of range"), (["--log-every", "-5"], "--log-every -5 is out of range"),
    (["-d", "tpu"], "-d tpu: not a device name"), (["-d", "cuda:7"], "-d cuda:7: "), (["-d", "xpu"], "-d xpu: ")])
def test_bad_flag_is_one_line_before_any_work(argv, needle, examples, tmp_path):
    """Checked before the examples or the model are read (-m names no model here, so a check that
    came later would end in another error)."""
    if argv[0] == "-d" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    data = write_jsonl(tmp_path / "val.jsonl", examples[:2])
    message = main_error(hellaswag, ["-m", tmp_path / "nope.pt", "--data-file", data] + argv)
    assert needle in message, message


def test_not_parquet(tmp_path):
    path = tmp_path / "val.parquet"
    path.write_text("not parquet")
    with pytest.raises(hellaswag.HellaSwagError, match="not a parquet file"):
        list(hellaswag.iterate_examples(data_file=path))


# ---------------------------------------------------------------------------- a stage-7 checkpoint as -m


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
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
    out = run_here("hellaswag", "-m", path, "-d", "cpu", "--data-file", data)   # missing
    assert_clean_error(out, "model_00004.pt", "no such checkpoint")
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-m", str(path), "-d", "cpu", "--data-file", str(data)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "model_00004.pt is not a checkpoint" in message
    assert len(message.splitlines()) == 1


# ---------------------------------------------------------------------------- rows that are not examples

BAD_ROWS = {  # what replaces example 1's fields -> what the message says is wrong
    "null-ending": ({"endings": ["b", "c", None, "e"]}, "its ending 2 is null, not a string"),
    "int-ending": ({"endings": ["b", "c", "d", 7]}, "its ending 3 is an int, not a string"),
    "endings-a-string": ({"endings": "bcde"}, "its endings are a str, not a list of 4 strings"),
    "three-endings": ({"endings": ["b", "c", "d"]}, "its endings are a list of 3, not a list of 4 strings"),
    "no-ctx": ({"ctx": None}, "its ctx is null, not a non-empty string"),
    "empty-ctx": ({"ctx": ""}, "its ctx is empty, not a non-empty string"),
    "label-4": ({"label": 4}, "its label is 4, not 0-3"),
    "label-true": ({"label": True}, "its label is True, not 0-3"),
    "label-float": ({"label": 1.5}, "its label is 1.5, not 0-3"),
    "label-word": ({"label": "two"}, "its label is 'two', not 0-3"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_is_one_line_naming_file_and_example(kind, examples, tmp_path):
    """A row with a non-string ending or an odd field: HellaSwagError naming the file, the example
    (index and ind) and what is wrong, before any model is loaded; the CLI exits with that line."""
    fields, problem = BAD_ROWS[kind]
    rows = [dict(ex) for ex in examples[:3]]
    rows[1].update(fields)
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    got = []
    with pytest.raises(hellaswag.HellaSwagError) as info:
        got.extend(hellaswag.iterate_examples(data_file=path))
    assert got == examples[:1]                                           # the row before it was fine
    assert f"{path}: example 1 (ind 1) is not a HellaSwag example: {problem}" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-m", "unused", "--data-file", str(path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and str(info.value) in message and len(message.splitlines()) == 1


def test_bad_hub_row_names_the_dataset(monkeypatch, examples):
    rows = [{**ex, "label": str(ex["label"])} for ex in examples[:3]]
    rows[2]["endings"] = rows[2]["endings"][:3] + [None]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    with pytest.raises(hellaswag.HellaSwagError, match=re.escape(
            "the hub dataset Rowan/hellaswag (validation): example 2 (ind 2) is not a HellaSwag example: "
            "its ending 3 is null")):
        list(hellaswag.iterate_examples("val"))


def test_text_that_spells_a_special_token_is_text(model, examples, enc):
    """"<|endoftext|>" written in an ending is scored as the text it is (tiktoken's encode raises)."""
    ex = {**examples[0], "endings": ["ends here <|endoftext|>"] + examples[0]["endings"][1:]}
    with pytest.raises(ValueError):
        enc.encode(ex["endings"][0])
    _, tokens, _, _ = hellaswag.render_example(ex, enc)
    row = enc.encode(ex["ctx"]) + enc.encode(" " + ex["endings"][0], disallowed_special=())
    assert tokens[0, :len(row)].tolist() == row and 50256 not in row
    assert len(list(hellaswag.predictions(lambda idx: model(idx).logits, [ex]))) == 1


def test_stage7_says_a_bad_row_once_and_trains_on(examples, tmp_path):
    """Stage 7 (its main, in this process): a HellaSwag file with a bad row turns HellaSwag off with
    one line naming the file and the example, and the run trains and logs val loss."""
    rows = [dict(ex) for ex in examples[:3]]
    rows[1]["endings"] = ["b", "c", None, "e"]
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", rows)
    out, steps = main_steps(load(STAGE7), RUN7 + STAGE7_QUICK + [
        "--data-dir", write_shards(tmp_path / "shards", [3001, 5003]), "--log-dir", tmp_path / "log",
        "--hellaswag-file", path])
    off = [line for line in out.splitlines() if "HellaSwag is off for this run" in line]
    assert len(off) == 1 and (f"{path}: example 1 (ind 1) is not a HellaSwag example: its ending 2 is null, "
                              "not a string; fix or remove that row") in off[0], out
    assert [r["step"] for r in steps] == [0] and "validation loss" in out and "HellaSwag accuracy" not in out


# ---------------------------------------------------------------------------- rows longer than the context

STAGE7_QUICK = ["--steps", "1", "--eval-every", "1", "--hellaswag-limit", "0", "--num-return-sequences", "1",
                "--max-length", "10"]


def long_examples(n=5, ctx_words=70, seed=1):
    """Examples whose rows are longer than the tiny models' context: a long context, and in the last
    one an ending longer than the context of 40 tokens too."""
    rows = make_examples(n, seed=seed)
    for i, ex in enumerate(rows):
        ex["ctx"] = " ".join(["the man picks up a small red bowl of water"] * (ctx_words // 10)) + ". " + ex["ctx"]
        ex["ind"] = 100 + i
    rows[-1]["endings"][1] = " ".join(["then she runs"] * 20) + "."
    return rows


def truncated_reference(model, ex, enc, block_size):
    """(label, pred, pred_norm, sums, means) from the plain loop on each row's last block_size tokens:
    the model reads only those, and the ending tokens among them after the first are scored."""
    ctx = enc.encode(ex["ctx"])
    sums, means = [], []
    for ending in ex["endings"]:
        end = enc.encode(" " + ending)
        row = (ctx + end)[-block_size:]
        with torch.no_grad():
            logits = model(torch.tensor([row])).logits[0]                # (len(row), V)
        n = min(len(end), len(row) - 1)                                  # scored: the last n tokens
        losses = F.cross_entropy(logits[:-1][-n:], torch.tensor(row[1:][-n:]), reduction="none")
        sums.append(losses.sum().item())
        means.append(losses.mean().item())
    return ex["label"], sums.index(min(sums)), means.index(min(means)), sums, means


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_long_rows_score_their_last_block_size_tokens(model, examples, reference, enc):
    """Rows longer than block_size: the same predictions (and losses) as the plain loop on each row's
    last block_size tokens, batched with short examples whose results do not change."""
    B = 40
    long = long_examples()
    assert all(len(enc.encode(ex["ctx"])) > B for ex in long)           # every row is cut ...
    assert max(len(enc.encode(" " + e)) for e in long[-1]["endings"]) > B  # ... one ending is longer than B
    assert max(len(enc.encode(ex["ctx"] + " " + e)) for ex in examples for e in ex["endings"]) <= B
    refs = [truncated_reference(model, ex, enc, B) for ex in long]
    for ex, (*_, sums, means) in zip(long, refs):                        # the mask is on the right tokens
        _, tokens, mask, _ = hellaswag.render_example(ex, enc, block_size=B)
        assert tokens.size(1) == B
        with torch.no_grad():
            sum_loss, mean_loss = hellaswag.row_losses(tokens, mask, model(tokens).logits)
        assert sum_loss.tolist() == pytest.approx(sums, rel=1e-4)
        assert mean_loss.tolist() == pytest.approx(means, rel=1e-4)
    fn = lambda idx: model(idx).logits
    mixed = [x for pair in zip(examples, long) for x in pair] + examples[len(long):]
    expected = [x for pair in zip(reference, [r[:3] for r in refs]) for x in pair] + reference[len(long):]
    assert list(hellaswag.predictions(fn, mixed, batch_size=4, block_size=B)) == expected
    assert list(hellaswag.predictions(fn, examples, batch_size=5, block_size=B)) == reference  # unchanged
    with pytest.raises(IndexError):                                      # what it was: n_positions is 64
        list(hellaswag.predictions(fn, long, block_size=None))


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_cli_uses_the_models_block_size(model, hf_dir, enc, tmp_path, capsys):
    """-m passes the model's own context: n_positions (64) for a save_pretrained folder, the config's
    block_size (48) for a stage-7 checkpoint; either model fails on a longer input."""
    from dataclasses import asdict
    long = long_examples()
    data = write_jsonl(tmp_path / "long.jsonl", long)
    assert min(len(enc.encode(ex["ctx"])) for ex in long) > 64
    n, acc, acc_norm = hellaswag.evaluate(lambda idx: model(idx).logits, long, batch_size=2, block_size=64)
    assert score(capsys, "-m", hf_dir, "-d", "cpu", "--data-file", data, "--batch-size", 2) == (
        f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))
    stage7 = load(STAGE7)
    torch.manual_seed(0)
    gpt = stage7.GPT(stage7.GPTConfig(block_size=48, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    path = tmp_path / "model_00001.pt"
    torch.save({"model": gpt.state_dict(), "config": asdict(gpt.config)}, path)
    n, acc, acc_norm = hellaswag.evaluate(lambda idx: gpt(idx)[0][..., :50257], long, block_size=48)
    assert score(capsys, "-m", path, "-d", "cpu", "--data-file", data) == (
        f"{acc / n:.4f}", f"{acc_norm / n:.4f}", str(n))


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_stage7_scores_a_row_longer_than_1024_tokens(examples, tmp_path):
    """Stage 7's step-0 HellaSwag on a context of over 1024 tokens: scored (on the last 1024), the run
    goes on; stage 7 calls evaluate(model_fn, examples, 8, device), block_size 1024 by default."""
    rows = [dict(ex) for ex in examples[:2]]
    rows[0]["ctx"] = " ".join(["the man picks up a small red bowl of water"] * 110) + ". " + rows[0]["ctx"]
    out, steps = main_steps(load(STAGE7), RUN7 + STAGE7_QUICK + [
        "--data-dir", write_shards(tmp_path / "shards", [3001, 5003]), "--log-dir", tmp_path / "log",
        "--hellaswag-file", write_jsonl(tmp_path / "hellaswag_val.jsonl", rows)])
    assert "HellaSwag accuracy" in out and [r["step"] for r in steps] == [0]
    assert re.search(r"^0 hella [\d.]+$", (tmp_path / "log" / "log.txt").read_text(), re.M)


# ---------------------------------------------------------------------------- damaged weights


def test_truncated_safetensors_is_one_line(hf_dir, examples, tmp_path):
    """A model.safetensors cut off halfway (an interrupted copy or download): safetensors raises its
    SafetensorError ("incomplete metadata, file not fully covered"); -m DIR says so in one line."""
    import shutil
    folder = tmp_path / "gpt2-ours"
    shutil.copytree(hf_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    data = write_jsonl(tmp_path / "val.jsonl", examples[:2])
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-m", str(folder), "-d", "cpu", "--data-file", str(data)])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: could not load model {str(folder)!r}: {weights} cannot be read (")
    assert "truncated or damaged" in message and "export it again" in message and "download it again" in message
    assert len(message.splitlines()) == 1
