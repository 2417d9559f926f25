"""Time the training step of stage 4, of each technique of stage 5 added in turn, and of stage 6.

All variants train the same 124M model size on the same batch, built from the stage scripts'
own classes, and are timed side by side: after warm-up (compilation included there), each round
runs one step of every variant in turn, so machine noise hits all of them alike. Reports the
median ms/step, tok/s, the ratio to stage 4, MFU (on a GPU in the stage scripts' PEAK_TFLOPS,
or with --peak-tflops; TF32's peak is taken as half of bf16's) and the compilation seconds (the
warm-up's time beyond its steps' own).

    python benchmarks/bench_speedup.py                   # CPU: B=4, T=128, 124M
    python benchmarks/bench_speedup.py -B 16 -T 1024     # a GPU: the lecture's setting
    python benchmarks/bench_speedup.py --device cpu -B 2 -T 64 --n-layer 2 --n-head 2 --n-embd 32

Variants: 4_ fp32 eager -> +TF32 (GPU only; a no-op on CPU) -> +bf16 autocast -> +torch.compile
-> +flash attention (SDPA) -> +vocab 50304 (= 5_) -> 6_ (AdamW 0.9/0.95 with weight-decay groups,
fused on CUDA, grad clipping, lr schedule; one micro-step per step so ms/step compares); on a
CPU also 5_ without compile, in bf16 and in float32 (its default where the CPU has no native
bf16). The half-precision rows use bf16 where the chip computes it, else fp16 (T4, V100; no
scaler: this times, it does not train).
All variants stay in memory side by side: at B=16, T=1024 ~30-35 GB of a GPU (an estimate; on CUDA
the last line prints the peak).
"""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from mfu import flops_per_token, peak_tflops  # noqa: E402  (benchmarks/, next to this file)

stage4 = importlib.import_module("4_train_init")
stage5 = importlib.import_module("5_train_speedup")
stage6 = importlib.import_module("6_train_hyperparams")


def make_variant(name, module, vocab, tf32, bf16, compile_, recipe, device, device_type, size,
                 half):
    torch.manual_seed(1337)
    model = module.GPT(module.GPTConfig(vocab_size=vocab, **size)).to(device)
    if recipe:
        optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step_model = torch.compile(model) if compile_ else model

    def step(x, y, it):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        with torch.autocast(device_type=device_type, dtype=half, enabled=bf16):
            _, loss = step_model(x, y)
        loss.backward()
        if recipe:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = stage6.get_lr(it, 6e-4, 10, 50)
        optimizer.step()
        # frees the gradients: 7 resident variants keep only weights and AdamW state
        optimizer.zero_grad()
        getattr(torch, device_type).synchronize()  # as stage 5 does: time the GPU, not the queue
        return loss.item()

    return {"name": name, "step": step, "model": model, "bf16": bf16, "tf32": tf32,
            "compiled": compile_, "times": []}


def expected_warmup(variants, compiled, compile_guess_s):
    """Seconds the next variant's warm-up is expected to take: as long as the slowest warm-up so
    far of its kind (compiled or eager); the first compiled one, compile_guess_s; eager, 0."""
    same = [v["warmup_s"] for v in variants if v["compiled"] == compiled]
    return max(same) if same else compile_guess_s if compiled else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-B", "--batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--skip-compile", action="store_true", help="leave out compiled variants")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's bf16 peak, for MFU")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no warm-up that would end after this many seconds (a compiled "
                        "one is expected to take as long as the last compiled one, or "
                        "--compile-guess-s); time those warmed up")
    parser.add_argument("--compile-guess-s", type=float, default=60,
                        help="the first compiled warm-up's expected seconds, for --deadline-s")
    args = parser.parse_args(argv)
    t_start = time.time()
    device = stage5.pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else device
    B, T = args.batch_size, args.seq_len
    gpu = device_type == "cuda"
    size = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    half = (torch.bfloat16 if device_type == "cpu" or stage5.native_bf16(device_type)
            else torch.float16)
    hp = "bf16" if half == torch.bfloat16 else "fp16"
    specs = [  # name, module, vocab, tf32, bf16, compile, recipe
        ("4_ fp32 eager", stage4, 50257, False, False, False, False),
        ("+ TF32", stage4, 50257, True, False, False, False),
        (f"+ {hp} autocast", stage4, 50257, True, True, False, False),
        ("+ torch.compile", stage4, 50257, True, True, True, False),
        ("+ flash attention (SDPA)", stage5, 50257, True, True, True, False),
        ("+ vocab 50304 (= 5_)", stage5, 50304, True, True, True, False),
        ("6_ recipe" + (", fused AdamW" if gpu else ""), stage6, 50304, True, True, True, True),
    ]
    # TF32 exists on NVIDIA tensor cores only; 5_'s CPU default is not to compile, and bf16 only
    # where the CPU computes it (native_bf16)
    if not gpu:
        specs = [s for s in specs if s[0] != "+ TF32"]
        native = stage5.native_bf16("cpu")
        specs.append((f"5_ bf16, no compile{' (= its default here)' if native else ''}", stage5,
                      50304, True, True, False, False))
        specs.append((f"5_ float32, no compile{'' if native else ' (= its default here)'}",
                      stage5, 50304, True, False, False, False))
    if args.skip_compile:
        specs = [s[:5] + (False,) + s[6:] for s in specs if s[0] != "+ torch.compile"]
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 50257, (B * T + 1,), generator=g)
    x, y = buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)

    variants = []
    for spec in specs:
        expected = expected_warmup(variants, spec[5], args.compile_guess_s)
        if args.deadline_s and time.time() - t_start + expected > args.deadline_s:
            rest = ", ".join(spec[0] for spec in specs[len(variants):])
            print(f"past --deadline-s {args.deadline_s:.0f} (the next warm-up would take "
                  f"~{expected:.0f} s): not timed: {rest}")
            break
        v = make_variant(*spec, device=device, device_type=device_type, size=size, half=half)
        t0 = time.time()
        for it in range(args.warmup):
            v["step"](x, y, it)
        v["warmup_s"] = time.time() - t0
        print(f"warm-up {v['name']}: {v['warmup_s']:.1f} s", flush=True)
        variants.append(v)
    for it in range(args.rounds):  # interleaved: one step of each variant per round
        for v in variants:
            t0 = time.perf_counter()
            v["step"](x, y, args.warmup + it)
            v["times"].append(time.perf_counter() - t0)

    name = torch.cuda.get_device_name() if gpu else device.upper()
    peak = peak_tflops(name if gpu else "", stage5.PEAK_TFLOPS, args.peak_tflops)
    peak_tf32 = peak_tflops(name, stage5.PEAK_TFLOPS, args.peak_tflops, tf32=True) if gpu else None
    base = statistics.median(variants[0]["times"])
    model = "124M" if (args.n_layer, args.n_head, args.n_embd) == (12, 12, 768) else \
        f"n_layer {args.n_layer} n_head {args.n_head} n_embd {args.n_embd}"
    print(f"\n{model}, B={B}, T={T}, {device} ({name}), torch {torch.__version__}, "
          f"median of {args.rounds} interleaved steps")
    print("| variant | ms/step | tok/s | vs 4_ |" + (" MFU |" if peak else "") + " compile s |")
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if peak else "") + " ---: |")
    for v in variants:
        dt = statistics.median(v["times"])
        row = f"| {v['name']} | {dt * 1000:.1f} | {B * T / dt:,.0f} | {base / dt:.2f}x |"
        # against the bf16 (fp16) or TF32 tensor-core peak; plain fp32 has none in the table
        if peak:
            p = peak if v["bf16"] else peak_tf32 if v["tf32"] else None
            row += (f" {100 * flops_per_token(v['model'].config, T) * B * T / dt / (p * 1e12):.1f}"
                    "% |" if p else " - |")
        # compilation: what the warm-up took beyond its steps' own time (first-call costs included)
        compile_s = max(0.0, v["warmup_s"] - args.warmup * dt)
        print(row + (f" {compile_s:.1f} |" if v["compiled"] else " - |"))
    if gpu:  # what the side-by-side variants took together
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved "
              f"({len(variants)} variants resident)")


if __name__ == "__main__":
    main()
