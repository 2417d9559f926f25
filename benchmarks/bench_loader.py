"""Peak memory of reading one 20M-token shard: stage 7's loader (the whole shard as uint16, cut into
int64 batches) vs loading the whole shard as int64 (the lecture's load_tokens: np.load -> int32 ->
torch.long).

Each variant runs in a fresh Python process that walks the whole shard in (B, T) batches; we
report the peak resident set size (ru_maxrss) above the same process's RSS after its imports.

    python benchmarks/bench_loader.py              # 20M tokens, B=16, T=1024
"""
import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def child(variant, data_dir, B, T):
    """Runs in the subprocess: walk one epoch of the shard, print peak RSS growth in MiB."""
    sys.path.insert(0, str(ROOT))
    import torch
    stage7 = importlib.import_module("7_train_ddp_fineweb")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    path = next(Path(data_dir).glob("edufineweb_train_*.npy"))
    n = len(np.load(path, mmap_mode="r"))
    batches = (n - 1) // (B * T)
    checksum = 0
    if variant == "uint16, whole (ours)":
        loader = stage7.DataLoaderLite(data_dir, "train", B, T, 0, 1)
        for _ in range(batches):
            x, y = loader.next_batch()
            checksum += int(x[0, 0]) + int(y[-1, -1])
    else:  # the whole shard as a torch.long tensor, sliced per batch
        tokens = torch.tensor(np.load(path).astype(np.int32), dtype=torch.long)
        for i in range(batches):
            buf = tokens[i * B * T:(i + 1) * B * T + 1]
            x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
            checksum += int(x[0, 0]) + int(y[-1, -1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_mib": (peak - base) / 1024, "batches": batches,
                      "checksum": checksum}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("-B", type=int, default=16)
    parser.add_argument("-T", type=int, default=1024)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.B, args.T)
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        np.save(Path(d) / "edufineweb_train_000001.npy",
                rng.integers(0, 50257, args.tokens, dtype=np.uint16))
        np.save(Path(d) / "edufineweb_val_000000.npy",
                rng.integers(0, 50257, 10_000, dtype=np.uint16))
        print(f"shard: {args.tokens:,} uint16 tokens = {args.tokens * 2 / 2**20:.0f} MiB on disk; "
              f"as int64: {args.tokens * 8 / 2**20:.0f} MiB")
        results = []
        for variant in ("uint16, whole (ours)", "whole shard as int64 (lecture)"):
            out = subprocess.run([sys.executable, __file__, "-B", str(args.B), "-T", str(args.T),
                                  "--child", variant, d],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert results[0]["checksum"] == results[1]["checksum"]  # both read the same batches
    print("| loader | peak RSS above imports | batches |")
    print("| --- | ---: | ---: |")
    for r in results:
        print(f"| {r['variant']} | {r['peak_mib']:.0f} MiB | {r['batches']:,} |")


if __name__ == "__main__":
    main()
