"""Tokenising throughput of fineweb.py: its Pool (all cores) against a one-process loop.

The corpus is ~30 MB of real English: documents of 500-8,000 characters (~1,300 tokens on
average; FineWeb-Edu's are ~1,000) cut at random from input.txt. Each figure is the median
of 3 runs; the Pool figure includes starting the pool, as a real run pays it too. "end to
end" is fineweb.main on the same documents as a jsonl file: read, tokenise, write shards.
"cores busy" (CPU seconds / wall seconds) tells whether the cores were really free.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/bench_fineweb.py
"""
import argparse
import contextlib
import io
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fineweb  # noqa: E402


def make_corpus(megabytes, seed=0):
    text = (ROOT / "input.txt").read_text()
    rng, docs, size = random.Random(seed), [], 0
    while size < megabytes * 1e6:
        n = rng.randint(500, 8000)
        start = rng.randrange(len(text) - n)
        docs.append(text[start:start + n])
        size += n
    return docs


def cpu_seconds():
    """CPU time of this process and its finished children (the Pool's workers, once joined)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def median_rates(fns, ntokens, runs=3):
    """{name: (tokens/s, cores busy)} of each fn, medians of `runs`; the fns take turns, so that
    a change in the machine's load (it may be shared) hits them alike."""
    walls, cores = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            fn()
            walls[name].append(time.perf_counter() - t0)
            cores[name].append((cpu_seconds() - c0) / walls[name][-1])
    return {name: (ntokens / statistics.median(walls[name]), statistics.median(cores[name]))
            for name in fns}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=float, default=30)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
    docs = make_corpus(args.megabytes)
    fineweb.encoder()  # load the BPE once, outside the timings
    ntokens = sum(len(fineweb.tokenize(d)) for d in docs)  # also warms the encoder's caches
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {ntokens:,} tokens, "
          f"{os.cpu_count()} cores")

    def one_process():
        for d in docs:
            fineweb.tokenize(d)

    def pool():
        for _ in fineweb.tokenized(docs, args.workers, threading.Event()):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        argv = ["--data-files", str(data), "--shard-size", str(10**7), "--out-dir", f"{tmp}/shards",
                "--workers", str(args.workers), "--overwrite"]

        def end_to_end():
            quiet = io.StringIO()  # its summary line and progress bar
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                fineweb.main(argv)

        rates = median_rates({"one": one_process, "pool": pool, "main": end_to_end}, ntokens)
    print(f"load average before: {load:.2f}  (cores busy = CPU seconds / wall seconds)")
    one = rates["one"][0]
    for name, label in [("one", "one-process loop"), ("pool", f"Pool, {args.workers} workers"),
                        ("main", "end to end (main)")]:
        rate, busy = rates[name]
        print(f"{label:18s}: {rate / 1e6:5.2f} M tokens/s  {rate / one:4.2f}x  "
              f"{busy:4.2f} cores busy")


if __name__ == "__main__":
    main()
