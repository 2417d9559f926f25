"""hellaswag.py: rendering, completion-style scoring (acc vs acc_norm), batching, CLI, download.

The reference everywhere is the plain loop: for each ending, run context + ending through the
model on its own and take the summed / mean cross-entropy of the ending's tokens.
"""
import json
import math
import re

import pytest
import requests
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

import hellaswag
from conftest import make_examples, run_script, write_jsonl

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


class FakeResponse:
    """Stands in for requests' streamed response: yields `chunks`, raising any exception one."""
    def __init__(self, chunks, status=200):
        self.chunks, self.status, self.headers = chunks, status, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        if self.status != 200:
            raise requests.HTTPError(f"{self.status} Client Error")

    def iter_content(self, chunk_size=1):
        for chunk in self.chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk


URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def refuse(*args, **kwargs):
    raise requests.ConnectionError("Failed to resolve 'raw.githubusercontent.com'")


@pytest.mark.parametrize("get", [
    refuse,                                                              # offline
    lambda *a, **k: FakeResponse([], status=404),                        # HTTP error
    lambda *a, **k: FakeResponse([b'{"ind": 0, "ctx": "half', requests.ConnectionError("reset")]),
], ids=["offline", "http404", "cut-mid-stream"])
def test_download_failure_is_clear_and_leaves_nothing(monkeypatch, tmp_path, get):
    monkeypatch.setattr(hellaswag.requests, "get", get)
    cache = tmp_path / "cache"
    with pytest.raises(hellaswag.HellaSwagError, match=re.escape(URL)) as info:
        list(hellaswag.iterate_examples("val", cache_dir=cache))
    assert "--data-file" in str(info.value)
    assert not cache.exists() or list(cache.iterdir()) == []             # no half-written file
    with pytest.raises(SystemExit) as exit_info:                         # the CLI: one line
        hellaswag.main(["-m", "unused", "--cache-dir", str(cache)])
    message = str(exit_info.value.code)
    assert URL in message and len(message.splitlines()) == 1
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_writes_cache_once(monkeypatch, tmp_path, examples):
    payload = "".join(json.dumps(ex) + "\n" for ex in examples).encode()
    calls = []

    def get(url, **kwargs):
        calls.append(url)
        assert kwargs.get("stream") and kwargs.get("timeout")
        return FakeResponse([payload[i:i + 100] for i in range(0, len(payload), 100)])
    monkeypatch.setattr(hellaswag.requests, "get", get)
    assert list(hellaswag.iterate_examples("val", cache_dir=tmp_path)) == examples
    assert calls == [URL] and sorted(p.name for p in tmp_path.iterdir()) == ["hellaswag_val.jsonl"]
    monkeypatch.setattr(hellaswag.requests, "get", refuse)               # now served from cache
    assert list(hellaswag.iterate_examples("val", cache_dir=tmp_path)) == examples
