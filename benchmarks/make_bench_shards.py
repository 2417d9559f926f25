"""Shards for timing stage 7 where FineWeb-Edu cannot be downloaded (a GPU machine without
internet): tiny Shakespeare's 338,025 GPT-2 tokens repeated, in fineweb.py's layout (uint16,
edufineweb_{split}_{index:06d}.npy, shard 0 = val). The text does not change the speed, and a
real text gives a real loss curve to compare an optimisation against.

    python benchmarks/make_bench_shards.py --out-dir bench_shards      # 1 val + 2 x 20M train
    python 7_train_ddp_fineweb.py --data-dir bench_shards --steps 30 --eval-every 1000
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import tiktoken

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "bench_shards"))
    parser.add_argument("--shard-size", type=int, default=20_000_000, help="tokens per train shard")
    parser.add_argument("--train-shards", type=int, default=2)
    parser.add_argument("--val-size", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    try:
        enc = tiktoken.get_encoding("gpt2")
    except OSError as e:
        sys.exit(f"error: could not get GPT-2's BPE files ({type(e).__name__}); "
                 "set TIKTOKEN_CACHE_DIR")
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    tokens = np.array([enc.eot_token] + enc.encode(text), dtype=np.uint16)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate([args.val_size] + [args.shard_size] * args.train_shards):
        # repeated, each shard from another offset
        shard = np.resize(np.roll(tokens, -index * 997), size)
        np.save(out / f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy", shard)
    print(f"wrote {1 + args.train_shards} shards to {out}")


if __name__ == "__main__":
    main()
