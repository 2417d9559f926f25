"""Benchmark: HellaSwag examples/s, batched vs one example per forward pass (CPU).

A small random GPT2LMHeadModel (4 layers, 4 heads, 256 dims) scores synthetic examples written
to a jsonl in the official format, with context and ending lengths in the range of the real
val set (contexts ~20-60 tokens, endings ~5-30). Not a test: it prints medians of --runs runs.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/bench_hellaswag.py
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hellaswag  # noqa: E402

WORDS = ("the a man woman boy girl dog cat ball kitchen garden river slowly quickly carefully "
         "picks up puts down runs jumps over under into bowl water knife bread paint brush wall "
         "then while he she they camera shows smiles talks rides bike horse rope ladder").split()


def sentence(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_examples(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            ctx_a, ctx_b = sentence(rng, rng.randint(15, 50)).capitalize() + ".", sentence(rng, 3)
            f.write(json.dumps({
                "ind": i, "activity_label": "Synthetic", "ctx_a": ctx_a, "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain",
                "source_id": f"bench~{i}", "label": rng.randrange(4),
                "endings": [sentence(rng, rng.randint(4, 28)) + "." for _ in range(4)],
            }) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    model_fn = lambda idx: model(idx).logits  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hellaswag_bench.jsonl"
        write_examples(path, args.examples)
        examples = list(hellaswag.iterate_examples(data_file=path))
    for ex in examples:
        hellaswag.render_example(ex)  # warm the tokenizer (loaded lazily on first use)

    print(f"{len(examples)} examples, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sizes = (1, args.batch_size)
    times, results = {bs: [] for bs in sizes}, {}
    for _ in range(args.runs):  # interleaved, so a slow spell on a shared machine hits both
        for bs in sizes:
            t0 = time.perf_counter()
            results[bs] = hellaswag.evaluate(model_fn, examples, batch_size=bs)
            times[bs].append(time.perf_counter() - t0)
    rates = {bs: len(examples) / statistics.median(times[bs]) for bs in sizes}
    for bs in sizes:
        print(f"batch_size {bs:3d}: {rates[bs]:7.1f} examples/s (median of {args.runs} runs: "
              + ", ".join(f"{t:.2f}" for t in times[bs]) + " s)")
    assert results[1] == results[args.batch_size], "batched counts differ from unbatched"
    print(f"speed-up batched/unbatched: {rates[args.batch_size] / rates[1]:.2f}x "
          f"(counts n, correct, correct_norm = {results[1]} both ways)")


if __name__ == "__main__":
    main()
