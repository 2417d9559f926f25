"""Stage 5 (make it fast) and stage 6 (GPT-3 recipe) claims, on a tiny model on CPU."""
import math

import pytest
import torch
from conftest import (ROOT, SCRIPTS, TINY, TORCHRUN, existing, load, main_steps, parse_steps, run_here, run_script,
                      write_shards)

FAST = existing(SCRIPTS[5:])  # stages with SDPA, autocast, compile and vocab 50304
RECIPE = existing(SCRIPTS[6:])  # stages with the GPT-3 recipe
CPU = TINY + ["--device", "cpu", "-B", "2", "-T", "16", "--num-return-sequences", "1", "--max-length", "9"]


def data_args(name, tmp_path):
    """Stages 5-6 train on input.txt; stage 7 needs shards, a log dir, and few evaluations."""
    if name != "7_train_ddp_fineweb":
        return []
    shards = write_shards(tmp_path / "shards", [2000, 5000])
    (tmp_path / "no_hellaswag.jsonl").write_text("")  # an empty HellaSwag file: none is scored
    return ["--data-dir", str(shards), "--log-dir", str(tmp_path / "log"), "--eval-every", "1000", "--val-tokens", "1",
            "--hellaswag-file", str(tmp_path / "no_hellaswag.jsonl")]


@pytest.mark.parametrize("name", FAST)
def test_sdpa_equals_masked_softmax_attention(name):
    """F.scaled_dot_product_attention(is_causal=True) computes stage 4's hand-written attention."""
    old, new = load("4_train_init"), load(name)
    config = old.GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    reference = old.CausalSelfAttention(config)
    sdpa = new.CausalSelfAttention(new.GPTConfig(**vars(config)))
    sdpa.load_state_dict(reference.state_dict())
    assert not list(sdpa.buffers())  # no leftover mask buffer
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
@pytest.mark.parametrize("name", existing(SCRIPTS[5:7]))  # stage 7's float32 path: test_ddp.py
def test_float32_path_is_plain_fp32_and_bf16_autocast_is_really_on(name):
    m = load(name)
    one_batch = ["--total-batch-size", "32"] if name in RECIPE else []  # loss of one B*T batch
    fp32 = m.main(CPU + one_batch + ["--steps", "2", "--dtype", "float32", "--no-compile"])
    bf16 = m.main(CPU + one_batch + ["--steps", "2", "--dtype", "bfloat16", "--no-compile"])
    # the float32 run's first loss is the plain fp32 loss of the same model on the first batch
    torch.manual_seed(1337)
    model = m.GPT(m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    buf = m.load_tokens(m.os.path.join(m.HERE, "input.txt"))[:2 * 16 + 1]
    with torch.no_grad():
        _, loss = model(buf[:-1].view(2, 16), buf[1:].view(2, 16))
    assert fp32[0] == pytest.approx(loss.item(), abs=1e-6)
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], abs=0.05)  # bf16 rounding


@pytest.mark.slow  # bf16 on a CPU without AVX512-BF16 or AMX is emulated: seconds per step
def test_bf16_autocast_trains_on_cpu():
    losses = load("5_train_speedup").main(TINY[:-4] + ["--n-head", "4", "--n-embd", "64", "--device", "cpu", "-B", "2",
                                                       "-T", "16", "--steps", "15", "--dtype", "bfloat16", "--no-compile"])
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.25  # 10.85 -> 10.52 (torch 2.13)


@pytest.mark.slow  # inductor compiles C++ for the CPU: tens of seconds
def test_torch_compile_on_cpu_matches_eager():
    m = load("5_train_speedup")
    eager = m.main(CPU + ["--steps", "2", "--dtype", "float32", "--no-compile"])
    compiled = m.main(CPU + ["--steps", "2", "--dtype", "float32", "--compile"])
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("name", FAST)
def test_padded_vocab_rows_are_never_targets_and_never_sampled(name, enc):
    m = load(name)
    tokens = torch.tensor(enc.encode((ROOT / "input.txt").read_text(encoding="utf-8")))
    assert tokens.max().item() < 50257 == enc.n_vocab  # the 47 padding ids are never targets
    torch.manual_seed(0)
    model = m.GPT(m.GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=32))
    # so training only ever pushes their logits down: d loss / d logit > 0 in every padded column
    logits, _ = model(tokens[:32].view(2, 16))
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 50304), tokens[1:33])
    loss.backward()
    assert (logits.grad[..., 50257:] > 0).all()
    # sampling masks them even when they are by far the most likely ids
    forward = model.forward

    def padding_wins(idx, targets=None):
        logits, loss = forward(idx, targets)
        return logits + 100.0 * (torch.arange(50304) >= 50257), loss

    model.forward = padding_wins
    idx = torch.tensor([enc.encode("Hello, I'm a language model,")] * 4)
    with torch.no_grad():
        assert model(idx)[0][:, -1].argmax(-1).min().item() >= 50257
    out = m.generate(model, idx, max_length=20, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 50257


@pytest.mark.parametrize("name", FAST)
def test_step_line_fields(name, tmp_path):
    """Stage 5 appends dt (ms) and tok/s; stage 6 appends lr and norm after them."""
    _, rows = main_steps(load(name), CPU + data_args(name, tmp_path) + ["--steps", "2", "--no-compile"])
    expected = ["step", "loss", "dt", "tok/s"] + (["lr", "norm"] if name in RECIPE else [])
    assert [list(r) for r in rows] == [expected] * 2  # no mfu on a CPU
    assert all(r["dt"] > 0 and r["tok/s"] > 0 for r in rows)


# ---------------------------------------------------------------------------- stage 6


@pytest.mark.parametrize("name", RECIPE)
def test_lr_schedule_is_the_lectures(name):
    """The lecture's get_lr exactly: warmup (step + 1) / warmup_steps, decay_ratio 0 at step warmup_steps (so the
    peak lasts two steps), min_lr only past max_steps (so the last step ends just above it)."""
    get_lr = load(name).get_lr
    lrs = [get_lr(s, 6e-4, 10, 50) for s in range(60)]
    assert lrs[0] == pytest.approx(6e-5)  # > 0: step 0 already learns
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup
    # the peak at warmup_steps - 1 and at warmup_steps
    assert lrs[9] == pytest.approx(6e-4) and lrs[10] == pytest.approx(6e-4) == max(lrs)
    assert lrs[11] == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi / 40)) * 5.4e-4)  # the cosine begins
    assert all(a > b for a, b in zip(lrs[10:50], lrs[11:51]))  # then strictly down to step 50
    assert lrs[30] == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # halfway through the decay: halfway down
    assert lrs[49] == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 39 / 40)) * 5.4e-4)  # the last step
    assert lrs[49] > 6e-5 and lrs[50:] == [pytest.approx(6e-5)] * 10  # min_lr at max_steps and after
    # the example: --warmup-steps 3 --steps 10 prints 6.0000e-04 at step 3 in the lecture's code
    assert [f"{get_lr(s, 6e-4, 3, 10):.4e}" for s in (2, 3, 4, 9)] == ["6.0000e-04", "6.0000e-04", "5.7326e-04",
                                                                         "8.6738e-05"]  # 6e-5+(1+cos(6pi/7))2.7e-4
    assert get_lr(0, 6e-4, 0, 1) == pytest.approx(6e-4)  # no warmup: the decay starts at the peak
    assert get_lr(4, 6e-4, 10, 5) == pytest.approx(3e-4)  # warmup longer than the run


@pytest.mark.parametrize("name", RECIPE)
def test_weight_decay_groups_124m(name, capsys):
    m = load(name)
    with torch.device("meta"):
        model = m.GPT(m.GPTConfig(vocab_size=50304))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert len(decay["params"]) == 50 and sum(p.numel() for p in decay["params"]) == 124_354_560
    assert len(no_decay["params"]) == 98 and sum(p.numel() for p in no_decay["params"]) == 121_344
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert not opt.defaults["fused"]  # fused only on CUDA
    assert "50, with 124,354,560" in capsys.readouterr().out


@pytest.mark.parametrize("name", RECIPE)
def test_gradient_accumulation_equals_one_big_batch(name, tmp_path):
    """4 micro-steps of B=2 give the losses and gradient norms of 1 step of B=8 (float32)."""
    m = load(name)
    common = TINY + ["--device", "cpu", "-T", "16", "--total-batch-size", "128", "--steps", "3",
                     "--dtype", "float32", "--no-compile"]
    out_small, small = main_steps(m, common + data_args(name, tmp_path / "2") + ["-B", "2"])
    out_big, big = main_steps(m, common + data_args(name, tmp_path / "8") + ["-B", "8"])
    assert "= 4 micro-steps" in out_small and "= 1 micro-steps" in out_big  # 4 x 32 vs 1 x 128 tokens
    for a, b in zip(small, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)  # same gradients, same norm
    assert small[0]["norm"] > 0.1


@pytest.mark.parametrize("name", RECIPE)
def test_total_batch_must_divide(name, tmp_path):
    proc = run_here(name, *CPU, *data_args(name, tmp_path), "--total-batch-size", "100")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--total-batch-size 100 is not a positive multiple of B*T" in last and "= 32;" in last


@pytest.mark.parametrize("name", FAST)
def test_mfu_field_is_flops_per_step_over_dt_and_peak(name, tmp_path):
    """mfu = (6 N + 12 L C T) tokens / dt / peak, N without the position embeddings (PaLM, appendix B): with
    --peak-tflops on a CPU, from the printed dt. For 124M at T=1024 that is 855,383,040 FLOPs per token."""
    m = load(name)
    one_batch = ["--total-batch-size", "32"] if name in RECIPE else []
    _, rows = main_steps(m, CPU + one_batch + data_args(name, tmp_path) + ["--steps", "1", "--no-compile",
                                                                           "--peak-tflops", "0.001"])
    n_params = 2 * 12_704 + 64 + 50304 * 32  # the tiny model: 2 blocks, ln_f, wte (tied to lm_head); no wpe
    per_token = 6 * n_params + 12 * 2 * 32 * 16
    expected = 100 * per_token * 32 / (rows[0]["dt"] / 1000) / 1e9
    assert rows[0]["mfu"] == pytest.approx(expected, rel=0.02)  # dt is printed rounded to 0.01 ms
    assert 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024 == 855_383_040


@pytest.mark.parametrize("name", FAST)
def test_peak_table_matches_gpu_names(name):
    """The first name in PEAK_TFLOPS found in torch.cuda.get_device_name() is the GPU's: "H100 PCIe" before
    "H100", "L40S" before "L40" before "L4" (dense bf16 TFLOP/s from NVIDIA's data sheets)."""
    table = load(name).PEAK_TFLOPS
    first = lambda gpu: next((tflops for chip, tflops in table.items() if chip in gpu), None)  # as main looks it up
    for gpu, tflops in [("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H100 80GB HBM3", 989),
                        ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA L4", 121),
                        ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA GeForce RTX 3090", 71),
                        ("Tesla T4", 65), ("Tesla V100-SXM2-16GB", 125), ("NVIDIA RTX A6000", 155)]:
        assert first(gpu) == tflops, gpu
    assert first("NVIDIA GeForce GTX 1080") is None  # unknown: no mfu unless --peak-tflops


@pytest.mark.parametrize("name, nproc", [(name, 1) for name in RECIPE] +
                         [pytest.param(name, 2, marks=pytest.mark.slow) for name in existing(SCRIPTS[7:])])
def test_divergence_stops_before_the_optimizer_step(name, nproc, tmp_path):
    """--max-lr 1e3 (float32, eager: deterministic) drives the gradient norm to inf within a few
    steps. The run stops at that step on every rank with one error line (which step, what to try,
    where to resume from), exit 1, no traceback; every checkpoint left (one per step) is finite."""
    every_step = ["--checkpoint-every", "1"] if name in SCRIPTS[7:] else []
    args = [*CPU, *data_args(name, tmp_path), *every_step, "--max-lr", "1e3", "--warmup-steps", "2", "--steps", "20",
            "--dtype", "float32", "--no-compile"]
    proc = run_script(name, *args, cmd=TORCHRUN + [f"{name}.py"]) if nproc == 2 else run_here(name, *args)
    rows = parse_steps(proc.stdout)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout + proc.stderr  # rank 0 alone says it
    assert f'{name}.py", line' not in proc.stderr  # no traceback from any rank (torchrun adds its own report)
    assert 1 <= len(rows) < 20 and all(math.isfinite(r["loss"]) and math.isfinite(r["norm"]) for r in rows)
    # the first non-finite step is the one after the last printed step; nothing of it was applied
    assert errors[0].startswith(f"error: step {len(rows)}: ") and ("nan" in errors[0] or "inf" in errors[0])
    assert "try a lower --max-lr" in errors[0]
    if not every_step:
        return  # stage 6 writes no checkpoints
    checkpoints = sorted((tmp_path / "log").glob("model_*.pt"))
    assert [p.name for p in checkpoints] == [f"model_{n:05d}.pt" for n in range(1, len(rows) + 1)]
    assert f"one-off fault, continue from {checkpoints[-1]} with: " in errors[0]  # the newest, after the last good step
    for path in checkpoints:
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), path
        assert all(torch.isfinite(t).all() for s in ckpt["optimizer"]["state"].values() for t in s.values()), path
