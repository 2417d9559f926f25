"""The CUDA code paths: `python -m pytest -m gpu` on a machine with an NVIDIA GPU.

Without CUDA every test here is skipped, so the default CPU run is unchanged. Each test runs the
real scripts on the GPU (bf16 autocast, torch.compile, fused AdamW, flash attention, nccl) with a
tiny model, so the whole file takes a few minutes, most of it compilation. What a GPU does that a
CPU does not, and how each test allows for it: the first step (and stage 7's first evaluation)
compiles, so it takes seconds and its printed MFU rounds to 0.00 (MFU is checked after warm-up);
TF32 and bf16 change the last bits (logits are compared with plain fp32 matmuls); backward kernels
add with atomics in no fixed order, which AdamW can amplify (a resumed run's first step is compared
exactly, later steps with a tolerance); the out-of-memory test fills the GPU (gpu_check runs it
alone). All of them live here: benchmarks/gpu_check.py collects this file only.
"""
import statistics
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, TINY, load, make_examples, parse_steps, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NAME = "7_train_ddp_fineweb"
WARMUP = 3  # steps that compile (step 0) and warm the allocator and autotuner: no speed read there


@pytest.fixture
def fp32_matmuls():
    """Plain fp32 (no TF32) for the tests that compare logits; restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def text_shards(tmp_path):
    """Stage-7 shards of real text (tiny Shakespeare), so that a few steps visibly lower the loss."""
    import tiktoken
    tokens = np.array(tiktoken.get_encoding("gpt2").encode((ROOT / "input.txt").read_text()), dtype=np.uint16)
    data = tmp_path / "shards"
    data.mkdir()
    np.save(data / "edufineweb_val_000000.npy", tokens[:20000])
    np.save(data / "edufineweb_train_000001.npy", tokens[20000:])
    (tmp_path / "no_hellaswag.jsonl").write_text("")
    return data


def stage7_args(data, log_dir):
    return ["--data-dir", data, "--log-dir", log_dir, "--hellaswag-file", data.parent / "no_hellaswag.jsonl",
            "--eval-every", "1000", "--val-tokens", "1", "--warmup-steps", "5", "--total-batch-size", "2048"]


def train(name, *args, cmd=None):
    """A tiny model on CUDA for 30 steps; returns (stdout, step rows), asserting a clean exit."""
    extra = stage7_args(*args[:2]) if name == NAME else ["--total-batch-size", "2048"] if name != SCRIPTS[5] else []
    rest = args[2:] if name == NAME else args
    proc = run_script(name, *TINY[:-4], "--n-head", "4", "--n-embd", "64", "--device", "cuda", "-B", "4", "-T", "128",
                      "--steps", "30", *extra, *rest, cmd=cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, parse_steps(proc.stdout)


def assert_trains(rows):
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_logits_equal_hf_on_cuda(name, hf_dir, fp32_matmuls):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).cuda().eval()
    ours = load(name).GPT.from_pretrained(str(hf_dir)).cuda().eval()
    idx = torch.randint(0, 50257, (3, 40), device="cuda")
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)[0][..., :50257]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SCRIPTS[5:])
def test_bf16_compile_trains_on_cuda(name, tmp_path, text_shards):
    args = (text_shards, tmp_path / "log") if name == NAME else ()
    out, rows = train(name, *args, "--dtype", "bfloat16", "--compile")
    assert "autocast bf16 | compile on" in out
    if name != SCRIPTS[5]:
        assert "using fused AdamW: True" in out
    if any(chip in torch.cuda.get_device_name() for chip in load(name).PEAK_TFLOPS):  # main's lookup finds it
        mfu = [r.get("mfu") for r in rows]
        assert all(m is not None and 0 <= m < 100 for m in mfu), rows  # every step, never over 100
        # step 0 compiles (seconds: a tiny model prints mfu 0.00 there); after warm-up it is above 0
        assert statistics.median(mfu[WARMUP:]) > 0, rows
    assert_trains(rows)


@pytest.mark.parametrize("name", SCRIPTS[5:])
def test_float16_grad_scaler_trains_on_cuda(name, tmp_path, text_shards):
    args = (text_shards, tmp_path / "log") if name == NAME else ()
    out, rows = train(name, *args, "--dtype", "float16", "--no-compile")
    assert "autocast fp16 + grad scaler" in out
    assert_trains(rows)


def test_stage7_torchrun_one_gpu_uses_nccl(tmp_path, text_shards):
    out, rows = train(NAME, text_shards, tmp_path / "log",
                      cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           f"{NAME}.py"])
    assert "DDP: 1 ranks, nccl" in out
    assert_trains(rows)


def test_exact_resume_on_cuda(tmp_path, text_shards):
    """float32 eager (TF32 matmuls, as stage 7 sets them). The resumed run's first step is the
    restored weights' forward on the restored batch: deterministic kernels, so it equals the
    straight run's. Later steps differ in the last bits: CUDA backward kernels (the memory-efficient
    attention's, the embeddings') add with atomics in no fixed order, and AdamW's division by
    sqrt(v) can turn such a difference in a near-zero gradient into a full-size step. rel 1e-3
    (about 0.008 in these losses) allows that; a wrong batch (another text: ~0.1 apart) fails it."""
    full, half = tmp_path / "full", tmp_path / "half"
    common = ("--dtype", "float32", "--no-compile", "--checkpoint-every", "15")
    _, rows = train(NAME, text_shards, full, *common)
    half.mkdir()
    (half / "model_00015.pt").write_bytes((full / "model_00015.pt").read_bytes())
    _, resumed = train(NAME, text_shards, half, *common, "--resume")
    assert [r["step"] for r in resumed] == list(range(15, 30))
    assert resumed[0]["loss"] == pytest.approx(rows[15]["loss"], rel=1e-6, abs=0)
    for a, b in zip(rows[15:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_hellaswag_batched_equals_one_at_a_time_on_cuda(hf_dir, fp32_matmuls):
    import hellaswag
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(hf_dir).cuda().eval()
    examples = make_examples(24)
    one = list(hellaswag.predictions(lambda idx: model(idx).logits, examples, 1, "cuda"))
    batched = list(hellaswag.predictions(lambda idx: model(idx).logits, examples, 8, "cuda"))
    assert batched == one


def test_out_of_memory_line_on_cuda():
    """GPT-2 124M at B=320, T=1024 (327,681 of input.txt's 338,025 tokens: the data admits it) needs ~270 GB,
    more than any single GPU has: one line with the -B to try, no traceback."""
    proc = run_script(SCRIPTS[5], "--device", "cuda", "-B", "320", "-T", "1024", "--steps", "1", "--no-compile")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: out of memory at -B 320 -T 1024 on cuda; try -B 160"
