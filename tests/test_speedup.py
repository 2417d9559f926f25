"""Stage 5 (make it fast) and stage 6 (GPT-3 recipe) claims, on a tiny model on CPU."""
import math

import pytest
import torch
from conftest import ROOT, SCRIPTS, TINY, TORCHRUN, existing, load, main_steps, parse_steps, run_script, write_shards

FAST = existing(SCRIPTS[5:])  # stages with SDPA, autocast, compile and vocab 50304
RECIPE = existing(SCRIPTS[6:])  # stages with the GPT-3 recipe
CPU = TINY + ["--device", "cpu", "-B", "2", "-T", "16"]


def data_args(name, tmp_path):
    """Stages 5-6 train on input.txt; stage 7 needs shards, a log dir, and few evaluations."""
    if name != "7_train_ddp_fineweb":
        return []
    shards = write_shards(tmp_path / "shards", [2000, 5000])
    (tmp_path / "no_hellaswag.jsonl").write_text("")  # an empty HellaSwag file: none is scored
    return ["--data-dir", str(shards), "--log-dir", str(tmp_path / "log"), "--eval-every", "1000", "--val-steps", "1",
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


def test_bf16_autocast_trains_on_cpu():
    losses = load("5_train_speedup").main(TINY[:-4] + ["--n-head", "4", "--n-embd", "64", "--device", "cpu", "-B", "2",
                                                       "-T", "16", "--steps", "25", "--dtype", "bfloat16", "--no-compile"])
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3


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
def test_lr_schedule(name):
    get_lr = load(name).get_lr
    lrs = [get_lr(s, 6e-4, 10, 50) for s in range(60)]
    assert lrs[0] == pytest.approx(6e-5)  # > 0: step 0 already learns
    assert lrs[9] == pytest.approx(6e-4) and max(lrs) == pytest.approx(6e-4)  # peak ends warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup
    assert all(a > b for a, b in zip(lrs[9:49], lrs[10:50]))  # then strictly down
    mid = 9 + (49 - 9) // 2  # halfway through the cosine: halfway between max and min
    assert lrs[mid] == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))
    assert lrs[49] == pytest.approx(6e-5)  # min (10% of max) at the last step
    assert lrs[50:] == [pytest.approx(6e-5)] * 10  # constant after
    assert get_lr(0, 6e-4, 0, 1) == pytest.approx(6e-5)  # no warmup, one step: min
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
    proc = run_script(name, *CPU, *data_args(name, tmp_path), "--total-batch-size", "100")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--total-batch-size 100 is not a positive multiple of B*T" in last and "= 32;" in last


@pytest.mark.parametrize("name", FAST)
def test_flops_per_token_and_mfu_field(name, tmp_path):
    """6N + 12 L H Q T (N without the position embeddings): 855,383,040 FLOPs per token for 124M
    at T=1024; with --peak-tflops, mfu = flops per step / dt / peak."""
    m = load(name)
    with torch.device("meta"):
        model = m.GPT(m.GPTConfig(vocab_size=50304))
    assert m.flops_per_token(model, 1024) == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    assert m.peak_flops("cpu", torch.bfloat16, None) is None  # no mfu on a CPU by default
    one_batch = ["--total-batch-size", "32"] if name in RECIPE else []
    _, rows = main_steps(m, CPU + one_batch + data_args(name, tmp_path) + ["--steps", "1", "--no-compile",
                                                                           "--peak-tflops", "0.001"])
    row = rows[0]
    with torch.device("meta"):
        tiny_model = m.GPT(m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    expected = 100 * m.flops_per_token(tiny_model, 16) * 32 / (row["dt"] / 1000) / 1e9
    assert row["mfu"] == pytest.approx(expected, rel=0.02)  # dt is printed rounded to 0.01 ms


@pytest.mark.parametrize("name", FAST)
def test_peak_flops_from_gpu_name(name, monkeypatch):
    m = load(name)
    for gpu, bf16, tf32 in [("NVIDIA A100-SXM4-80GB", 312e12, 156e12), ("NVIDIA H100 80GB HBM3", 989.4e12, 494.7e12),
                            ("NVIDIA H100 PCIe", 756e12, 378e12), ("NVIDIA H200", 989.4e12, 494.7e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, g=gpu: g)
        assert m.peak_flops("cuda", torch.bfloat16, None) == pytest.approx(bf16)
        assert m.peak_flops("cuda", torch.float32, None) == pytest.approx(tf32)  # TF32 matmuls
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4090")
    assert m.peak_flops("cuda", torch.bfloat16, None) is None  # unknown: no mfu unless --peak-tflops
    assert m.peak_flops("cuda", torch.bfloat16, 165.0) == 165e12


@pytest.mark.parametrize("name, nproc", [(name, 1) for name in RECIPE] + [(name, 2) for name in existing(SCRIPTS[7:])])
def test_divergence_stops_before_the_optimizer_step(name, nproc, tmp_path):
    """--max-lr 1e3 (float32, eager: deterministic) drives the gradient norm to inf within a few
    steps. The run stops at that step on every rank with one error line (which step, what to try,
    where to resume from), exit 1, no traceback; every checkpoint left (one per step) is finite."""
    cmd = TORCHRUN + [f"{name}.py"] if nproc == 2 else None
    every_step = ["--checkpoint-every", "1"] if name in SCRIPTS[7:] else []
    proc = run_script(name, *CPU, *data_args(name, tmp_path), *every_step, "--max-lr", "1e3", "--warmup-steps", "2",
                      "--steps", "20", "--dtype", "float32", "--no-compile", cmd=cmd)
    rows = parse_steps(proc.stdout)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout + proc.stderr  # rank 0 alone says it
    assert f'{name}.py", line' not in proc.stderr  # no traceback from any rank (torchrun adds its own report)
    assert 1 <= len(rows) < 20 and all(math.isfinite(r["loss"]) and math.isfinite(r["norm"]) for r in rows)
    # the first non-finite step is the one after the last printed step; nothing of it was applied
    assert errors[0].startswith(f"error: step {len(rows)}: ") and ("nan" in errors[0] or "inf" in errors[0])
    assert "a lower --max-lr" in errors[0]
    if not every_step:
        assert "start again" in errors[0]  # stage 6 writes no checkpoints
        return
    checkpoints = sorted((tmp_path / "log").glob("model_*.pt"))
    assert [p.name for p in checkpoints] == [f"model_{n:05d}.pt" for n in range(1, len(rows) + 1)]
    assert f"--resume from {checkpoints[-1]}," in errors[0]  # the newest, written after the last good step
    for path in checkpoints:
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), path
        assert all(torch.isfinite(t).all() for s in ckpt["optimizer"]["state"].values() for t in s.values()), path
