"""Peak memory of the training step of stages 5-7 by -B: which -B fits a GPU.

The step is stage 7's (stage 6's without DDP): GPT-2 124M with vocab 50304 (the stage-5 module's
classes), autocast bf16 (fp16 on a GPU without bf16), two micro-steps of (B, T) accumulated, grad
clipping, fused AdamW on CUDA. Two optimisation steps per B, so AdamW's state (allocated at the
first step) is there during the second step's forward and backward. Per B it prints one row of
torch.cuda.max_memory_allocated and max_memory_reserved (the caching allocator's peak: what the
GPU must hold, plus the CUDA context of ~0.5 GiB outside it), eager and compiled.

    python benchmarks/bench_memory.py                           # CUDA: 124M, T=1024, B=1, 2, 4, ...
    python benchmarks/bench_memory.py --device cpu --n-layer 2 --n-head 2 --n-embd 32 -T 64

B doubles until the first out-of-memory error (recorded, then the sweep stops), a B whose need,
extrapolated from the last two rows, exceeds --memory-fraction of the GPU (not tried), --max-batch,
or --deadline-s. Compiled, the batch dimension is marked dynamic, so one compilation serves every
B >= 2; B=1 (which torch.compile specialises) is compiled separately, last. On a CPU the columns are
the process's peak resident memory (above its size before the first step, and in total); on mps,
the most torch.mps reports after forward, backward and AdamW (not a true peak).
"""
import argparse
import gc
import importlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
stage5 = importlib.import_module("5_train_speedup")
GIB = 2**30


class Meter:
    """Peak memory in bytes, (allocated, reserved), per device type."""

    def __init__(self, device_type):
        self.device_type = device_type
        self.base_rss = None
        self.samples = [0, 0]

    @staticmethod
    def rss():
        """(peak, current) resident bytes: Linux's VmHWM/VmRSS, else getrusage's peak for both."""
        try:
            with open("/proc/self/status") as f:
                vm = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
            return int(vm["VmHWM"].split()[0]) * 1024, int(vm["VmRSS"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            import resource  # POSIX; ru_maxrss is KiB on Linux, bytes on macOS
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    * (1 if sys.platform == "darwin" else 1024))
            return peak, peak

    def start(self):
        gc.collect()
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif self.device_type == "mps":
            torch.mps.empty_cache()
            self.samples = [0, 0]
        else:
            try:  # glibc keeps freed memory mapped: hand it back first, so the base is what is live
                import ctypes
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:  # Linux: "5" resets the peak (VmHWM) to the current size: each B gets its own peak
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base_rss = self.rss()[1]
            except OSError:  # elsewhere the peak only rises; B grows, so its rise is still this B's
                self.base_rss = self.base_rss or self.rss()[0]

    def sample(self):
        if self.device_type == "mps":
            now = (torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory())
            self.samples = [max(a, b) for a, b in zip(self.samples, now)]

    def peak(self):
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        if self.device_type == "mps":
            return tuple(self.samples)
        peak = self.rss()[0]
        return peak - self.base_rss, peak


def train_step(step_model, model, optimizer, x, y, device_type, dtype, meter, micro_steps):
    """Stage 7's optimisation step: micro-steps of forward + backward, clip, AdamW."""
    for _ in range(micro_steps):
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = step_model(x, y)
        meter.sample()
        (loss / micro_steps).backward()
        meter.sample()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    meter.sample()
    optimizer.zero_grad(set_to_none=True)
    getattr(torch, device_type).synchronize()


def batches(max_batch, compiled, min_batch=1):
    """1, 2, 4, ... up to max_batch (from min_batch); compiled, B=1 goes last (its own specialised
    compilation)."""
    bs = [2**i for i in range(max_batch.bit_length()) if min_batch <= 2**i <= max_batch]
    return bs[1:] + bs[:1] if compiled and bs[:1] == [1] else bs


def sweep(mode, args, device, device_type, dtype, limit, t_start):
    """One model and optimizer per mode; a row per B, printed at once (a kill keeps the rows
    so far)."""
    compiled = mode == "compile"
    config = stage5.GPTConfig(vocab_size=50304, block_size=max(1024, args.seq_len),
                              n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(0)
    model = stage5.GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device_type == "cuda")
    step_model = torch.compile(model) if compiled else model
    meter = Meter(device_type)
    rows, stopped = [], False
    for B in batches(args.max_batch, compiled, args.min_batch):
        if stopped and B != 1:  # compiled, B=1 comes last and is still measured after a stop
            continue
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            print(f"stop {mode}: B={B} not tried, past --deadline-s {args.deadline_s:.0f}",
                  flush=True)
            break
        grow = [r for r in rows if r[0] >= 2]
        # peak(B) grows about linearly: extrapolate
        if limit and len(grow) >= 2 and B > grow[-1][0]:
            (b1, r1), (b2, r2) = (grow[-2][0], grow[-2][2]), (grow[-1][0], grow[-1][2])
            predicted = r2 + (r2 - r1) / (b2 - b1) * (B - b2)
            if predicted > limit:
                print(f"stop {mode}: B={B} not tried, it would need ~{predicted / GIB:.1f} GiB "
                      f"> the limit {limit / GIB:.1f} GiB", flush=True)
                stopped = True
                continue
        g = torch.Generator().manual_seed(B)
        x = torch.randint(0, 50257, (B, args.seq_len), generator=g).to(device)
        y = torch.randint(0, 50257, (B, args.seq_len), generator=g).to(device)
        if compiled and B >= 2:  # one graph for every B >= 2 (a size of 1 is always specialised)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(y, 0)
        meter.start()
        try:
            t0 = time.time()
            train_step(step_model, model, optimizer, x, y, device_type, dtype, meter,
                       args.micro_steps)
            t1 = time.time()
            train_step(step_model, model, optimizer, x, y, device_type, dtype, meter,
                       args.micro_steps)
            t2 = time.time()
        except torch.OutOfMemoryError as e:
            print(f"OOM {mode}: B={B}: {str(e).splitlines()[0][:160]}", flush=True)
            stopped = True
        except Exception as e:  # a compiler error, say: the rows so far stand
            print(f"error {mode}: B={B}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
            stopped = True
        if stopped:
            optimizer.zero_grad(set_to_none=True)
            del x, y
            meter.start()
            continue
        allocated, reserved = meter.peak()
        rows.append((B, allocated, reserved))
        print(f"| {mode} | {B} | {allocated / GIB:.3f} | {reserved / GIB:.3f} | "
              f"{t1 - t0:.1f} | {t2 - t1:.3f} |", flush=True)
    del step_model, model, optimizer
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-T", "--seq-len", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--max-batch", type=int, default=512,
                        help="524,288 / 1024: the largest -B the full run takes")
    parser.add_argument("--min-batch", type=int, default=1,
                        help="the smallest -B tried (B=1 compiled is a compilation of its own)")
    parser.add_argument("--modes", default=None,
                        help="eager,compile (default on CUDA; eager elsewhere)")
    parser.add_argument("--micro-steps", type=int, default=2,
                        help="accumulated per optimisation step")
    parser.add_argument("--memory-fraction", type=float, default=0.95,
                        help="the most of the GPU's memory the sweep may take "
                             "(the rest stays free)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="try no new B after this many seconds")
    args = parser.parse_args(argv)
    t_start = time.time()
    device = stage5.pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else device
    modes = (args.modes or ("eager,compile" if device_type == "cuda" else "eager")).split(",")
    dtype = (torch.bfloat16 if stage5.native_bf16(device_type)
             else torch.float16 if device_type != "cpu" else torch.float32)
    torch.set_float32_matmul_precision("high")
    limit = None
    if device_type == "cuda":
        name, total = (torch.cuda.get_device_name(),
                       torch.cuda.get_device_properties(device).total_memory)
        # beyond it: an OOM error, not a full GPU
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
        limit = args.memory_fraction * total
        torch.zeros(1, device=device)  # create the CUDA context
        free, _ = torch.cuda.mem_get_info()
        print(f"device: {name} | total {total / GIB:.2f} GiB | in use before the sweep "
              f"(CUDA context, other processes) {(total - free) / GIB:.2f} GiB")
        columns = "peak allocated GiB | peak reserved GiB"
    elif device_type == "mps":
        # beyond it macOS swaps, or fails
        limit = args.memory_fraction * torch.mps.recommended_max_memory()
        print(f"device: mps (Apple GPU; unified memory, {limit / GIB:.1f} GiB for the sweep)")
        columns = "most allocated GiB | most driver-allocated GiB"
    else:
        total = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                 if hasattr(os, "sysconf") else None)
        limit = 0.5 * total if total else None
        print(f"device: cpu | RAM {total / GIB:.2f} GiB" if total else "device: cpu")
        columns = "peak RSS above start GiB | peak RSS GiB"
    print(f"model: n_layer {args.n_layer} n_head {args.n_head} n_embd {args.n_embd}, "
          f"vocab 50304 | T {args.seq_len} | autocast {str(dtype)[6:]} | "
          f"{args.micro_steps} micro-steps per step | AdamW"
          f"{' (fused)' if device_type == 'cuda' else ''} | modes {','.join(modes)}")
    print(f"| mode | B | {columns} | first step s | second step s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for mode in modes:
        sweep(mode, args, device, device_type, dtype, limit, t_start)
    if device_type == "cuda":
        free, total = torch.cuda.mem_get_info()
        print(f"context: {(total - free - torch.cuda.memory_reserved()) / GIB:.2f} GiB in use "
              "outside PyTorch's caching allocator (CUDA context, cuBLAS/cuDNN, other processes)")
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
