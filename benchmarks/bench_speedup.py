"""Time the training step of stage 4, of each technique of stage 5 added in turn, and of stage 6.

All variants train the same 124M model size on the same batch, built from the stage scripts'
own classes, and are timed side by side: after warm-up (compilation included there), each round
runs one step of every variant in turn, so machine noise hits all of them alike. Reports the
median ms/step, tok/s, the ratio to stage 4 and (on a known GPU) MFU.

    python benchmarks/bench_speedup.py                   # CPU: B=4, T=128, 124M
    python benchmarks/bench_speedup.py -B 16 -T 1024     # a GPU: the lecture's setting

Variants: 4_ fp32 eager -> +TF32 (GPU only; a no-op on CPU) -> +bf16 autocast -> +torch.compile
-> +flash attention (SDPA) -> +vocab 50304 (= 5_) -> 6_ (AdamW 0.9/0.95 with weight-decay groups,
fused on CUDA, grad clipping, lr schedule; one micro-step per step so ms/step compares); on a
CPU also 5_ as it runs there by default (bf16, SDPA, vocab 50304, no compile).
"""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
stage4 = importlib.import_module("4_train_init")
stage5 = importlib.import_module("5_train_speedup")
stage6 = importlib.import_module("6_train_hyperparams")


def make_variant(name, module, vocab, tf32, bf16, compile_, recipe, device, device_type):
    torch.manual_seed(1337)
    model = module.GPT(module.GPTConfig(vocab_size=vocab)).to(device)
    if recipe:
        optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step_model = torch.compile(model) if compile_ else model

    def step(x, y, it):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        optimizer.zero_grad()
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = step_model(x, y)
        loss.backward()
        if recipe:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = stage6.get_lr(it, 6e-4, 10, 50)
        optimizer.step()
        getattr(torch, device_type).synchronize()  # as stage 5 does: time the GPU, not the queue
        return loss.item()

    return {"name": name, "step": step, "model": model, "bf16": bf16, "tf32": tf32, "times": []}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-B", "--batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--skip-compile", action="store_true", help="leave out compiled variants")
    args = parser.parse_args()
    device = stage5.pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else device
    B, T = args.batch_size, args.seq_len
    gpu = device_type == "cuda"
    specs = [  # name, module, vocab, tf32, bf16, compile, recipe
        ("4_ fp32 eager", stage4, 50257, False, False, False, False),
        ("+ TF32", stage4, 50257, True, False, False, False),
        ("+ bf16 autocast", stage4, 50257, True, True, False, False),
        ("+ torch.compile", stage4, 50257, True, True, True, False),
        ("+ flash attention (SDPA)", stage5, 50257, True, True, True, False),
        ("+ vocab 50304 (= 5_)", stage5, 50304, True, True, True, False),
        ("6_ recipe" + (", fused AdamW" if gpu else ""), stage6, 50304, True, True, True, True),
    ]
    if not gpu:  # TF32 exists on NVIDIA tensor cores only; 5_'s CPU default is not to compile
        specs = [s for s in specs if s[0] != "+ TF32"]
        specs.append(("5_ as on CPU by default (no compile)", stage5, 50304, True, True, False, False))
    if args.skip_compile:
        specs = [s[:5] + (False,) + s[6:] for s in specs if s[0] != "+ torch.compile"]
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 50257, (B * T + 1,), generator=g)
    x, y = buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)

    variants = []
    for spec in specs:
        v = make_variant(*spec, device=device, device_type=device_type)
        t0 = time.time()
        for it in range(args.warmup):
            v["step"](x, y, it)
        print(f"warm-up {v['name']}: {time.time() - t0:.1f} s", flush=True)
        variants.append(v)
    for it in range(args.rounds):  # interleaved: one step of each variant per round
        for v in variants:
            t0 = time.perf_counter()
            v["step"](x, y, args.warmup + it)
            v["times"].append(time.perf_counter() - t0)

    peak = stage5.peak_flops(device_type, torch.bfloat16, None)
    base = statistics.median(variants[0]["times"])
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"\n124M, B={B}, T={T}, {device} ({name}), torch {torch.__version__}, "
          f"median of {args.rounds} interleaved steps")
    print("| variant | ms/step | tok/s | vs 4_ |" + (" MFU |" if peak else ""))
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if peak else ""))
    for v in variants:
        dt = statistics.median(v["times"])
        row = f"| {v['name']} | {dt * 1000:.1f} | {B * T / dt:,.0f} | {base / dt:.2f}x |"
        if peak:  # against the bf16 or TF32 tensor-core peak; plain fp32 has no entry in the table
            p = peak if v["bf16"] else stage5.peak_flops(device_type, torch.float32, None) if v["tf32"] else None
            row += f" {100 * stage5.flops_per_token(v['model'], T) * B * T / dt / p:.1f}% |" if p else " - |"
        print(row)


if __name__ == "__main__":
    main()
