"""What stage 7's shard checks cost: the start-up check of every train shard (header and size only,
as before, vs header, size and the digest of its first and last MiB that --resume compares), and
opening a shard to train on (a memory map with a pass for its largest id, as before, vs reading it
whole with that pass), in time and peak memory.

Shards are random uint16 tokens of FineWeb-Edu's size (100M tokens, 200 MB). "cold" drops each
file from the page cache first (posix_fadvise DONTNEED), as after a reboot or for shards just
copied from elsewhere; "warm" reads them again from the page cache. --sparse N times the start-up
check on N shards of full size whose middles are holes (the check reads only their ends), so that
FineWeb-Edu's 100 shards take 400 MB of disk instead of 20 GB.

    python benchmarks/bench_shard_checks.py --shards 10     # 2 GB in a temporary folder
    python benchmarks/bench_shard_checks.py --shards 1 --sparse 100
"""
import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def drop_cache(paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def start_up(paths, digest):
    """Seconds to check every shard at start-up, as stage 7's loader does."""
    stage7 = importlib.import_module("7_train_ddp_fineweb")
    longrun = importlib.import_module("longrun")
    t0 = time.perf_counter()
    for p in paths:
        tokens = stage7.load_tokens(p)  # the header, through a memory map
        if digest:
            longrun.shard_identity(p, tokens)
    return time.perf_counter() - t0


def child(variant, path, cold):
    """Runs in a fresh process: open one shard to train on; print seconds and peak RSS growth."""
    stage7 = importlib.import_module("7_train_ddp_fineweb")
    if cold:
        drop_cache([path])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    if variant == "memory map + max (before)":
        tokens = np.load(path, mmap_mode="r")
        assert tokens.max() < 50257
    else:
        tokens = stage7.load_tokens(path, whole=True)  # reads it whole, checks the ids
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - base) / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10, help="train shards to make")
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--sparse", type=int, default=0,
                        help="time the start-up on N sparse shards")
    parser.add_argument("--dir", help="where to make them (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2] == "cold")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.shards):
            paths.append(os.path.join(d, f"edufineweb_train_{i + 1:06d}.npy"))
            np.save(paths[-1], rng.integers(0, 50257, args.tokens, dtype=np.uint16))
        print(f"{args.shards} shards of {args.tokens:,} tokens "
              f"({args.tokens * 2 / 1e6:.0f} MB each)")
        checked = paths
        if args.sparse:
            checked, ends = [], 1 << 19  # the first and last MiB hold tokens, the rest is a hole
            for i in range(args.sparse):
                checked.append(os.path.join(d, f"sparse_{i:06d}.npy"))
                tokens = np.lib.format.open_memmap(checked[-1], "w+", np.uint16, (args.tokens,))
                tokens[:ends] = rng.integers(0, 50257, ends, dtype=np.uint16)
                tokens[-ends:] = rng.integers(0, 50257, ends, dtype=np.uint16)
                tokens.flush()
                del tokens
            print(f"start-up check on {args.sparse} sparse shards of that size")
        print("| start-up check of every shard | cold | warm | per 100 shards, cold |")
        print("| --- | ---: | ---: | ---: |")
        for name, digest in (("header and size (before)", False),
                             ("+ digest of first and last MiB", True)):
            drop_cache(checked)
            cold = start_up(checked, digest)
            warm = start_up(checked, digest)
            print(f"| {name} | {cold:.3f} s | {warm:.3f} s | {cold * 100 / len(checked):.2f} s |")
        print("\n| opening a shard to train on | cold | warm | peak RSS growth |")
        print("| --- | ---: | ---: | ---: |")
        for variant in ("memory map + max (before)", "read whole + max (now)"):
            runs = {}
            for cache in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", variant, paths[0],
                                      cache], capture_output=True, text=True, check=True)
                runs[cache] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {variant} | {runs['cold']['seconds']:.2f} s | "
                  f"{runs['warm']['seconds']:.2f} s | {runs['warm']['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
