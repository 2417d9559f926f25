"""Stage 7 against stage 8 at a scale this machine runs: the real scripts, the same tokens, seeds.

Each recipe is a real stage script: its module is imported afresh and its main(argv) called, on the
same shards, in the same order, at the same batch and steps (the train batches each run takes are
hashed, and the table shows that every recipe took the same ones). Printed, over the seeds:
- stage 7 and stage 8, each at its best --max-lr of a few (tuned on the first seed): final val loss,
  mean +- std, and each seed's;
- stage 8 with one change reverted at a time (leave-one-out), at stage 8's best --max-lr;
- tokens-to-target: the fraction of stage 7's tokens after which stage 8's mean val loss (from the
  evaluations along the way, linearly interpolated) reaches stage 7's final mean val loss.

A change is reverted by swapping one component of the imported stage-8 module (its norm, rotary,
MLP.forward, GPT.__init__ or configure_optimizers) before main runs: the learner's file keeps no
switches for the benchmark, and each swap is the few lines below.

    python benchmarks/ladder.py            # 34 runs, ~45 min on 2 cores (tiny Shakespeare, 3 seeds)
    python benchmarks/ladder.py --quick    # a few minutes: one seed, fewer steps, no LR search
    python benchmarks/ladder.py --data-dir edu_fineweb10B   # any shards fineweb.py wrote
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE7, STAGE8 = "7_train_ddp_fineweb", "8_train_modern"


# ---------------------------------------------------------------------------- leave-one-out swaps
# Each takes the freshly imported stage-8 module (and the run's options) and reverts one change.

def no_muon(m, opts):
    """AdamW for the blocks' matrices too, at stage 7's best LR, betas and weight decay."""
    build = m.GPT.configure_optimizers

    def configure(self, weight_decay, learning_rate, device_type, log=print):
        muon, adamw = build(self, weight_decay, learning_rate, device_type, log).optimizers
        matrices = [p for group in muon.param_groups for p in group["params"]]
        adamw.add_param_group(dict(params=matrices, lr_scale=opts["stage7_lr"] / learning_rate,
                                   lr=opts["stage7_lr"], betas=(0.9, 0.95), weight_decay=0.1))
        return m.Optimizers(adamw)
    m.GPT.configure_optimizers = configure


def learned_positions(m, opts):
    """GPT-2's learned position embeddings (wpe) added to the token embeddings; no rotary."""
    import torch
    from torch import nn
    m.rotary = lambda x, cos, sin: x

    class WithPositions(nn.Module):
        def __init__(self, wte, block_size):
            super().__init__()
            self.wte, self.wpe = wte, nn.Embedding(block_size, wte.embedding_dim)
            nn.init.normal_(self.wpe.weight, std=1.0)  # as stage 8's wte

        @property
        def weight(self):
            return self.wte.weight

        def forward(self, idx):
            return self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
    init = m.GPT.__init__

    def new_init(self, config):
        init(self, config)
        self.transformer.wte = WithPositions(self.transformer.wte, config.block_size)
    m.GPT.__init__ = new_init


def layernorm(m, opts):
    """LayerNorm (mean subtracted, no gain or bias) instead of RMSNorm, everywhere (QK-norm too)."""
    from torch.nn import functional as F
    m.norm = lambda x: F.layer_norm(x, (x.size(-1),))


def no_qk_norm(m, opts):
    """No QK-norm: q and k (the only 4-D tensors norm sees) pass through."""
    norm = m.norm
    m.norm = lambda x: x if x.dim() == 4 else norm(x)


def gelu(m, opts):
    """GPT-2's tanh GELU instead of ReLU^2."""
    from torch.nn import functional as F
    m.MLP.forward = lambda self, x: self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def tied_head(m, opts):
    """lm_head tied to wte (GPT-2's), std 0.02, at the head's LR; projections still start at 0."""
    import torch
    init, build = m.GPT.__init__, m.GPT.configure_optimizers

    def new_init(self, config):
        init(self, config)
        self.lm_head.weight = self.transformer.wte.weight
        torch.nn.init.normal_(self.lm_head.weight, std=0.02)

    def configure(self, *args, **kw):
        optimizers = build(self, *args, **kw)
        for group in optimizers.param_groups:
            group["lr"] *= 0.16 / group["lr_scale"] if group["lr_scale"] == 12.0 else 1.0
            group["lr_scale"] = 0.16 if group["lr_scale"] == 12.0 else group["lr_scale"]
        return optimizers
    m.GPT.__init__, m.GPT.configure_optimizers = new_init, configure


def no_zero_init(m, opts):
    """GPT-2's init for lm_head and the projections (std 0.02, projections x 1/sqrt(2 n_layer))."""
    import torch
    init = m.GPT.__init__

    def new_init(self, config):
        init(self, config)
        torch.nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                torch.nn.init.normal_(proj.weight, std=0.02 * (2 * config.n_layer) ** -0.5)
    m.GPT.__init__ = new_init


def no_softcap(m, opts):
    """No logit softcap (a cap of 10,000: tanh(x / 1e4) * 1e4 = x to 1e-6 for these logits)."""
    init = m.GPT.__init__
    m.GPT.__init__ = lambda self, config: init(self, dataclasses.replace(config, logit_softcap=1e4))


REVERTS = {  # the change reverted: the swap that reverts it
    "Muon -> AdamW": no_muon,
    "rotary -> learned wpe": learned_positions,
    "RMSNorm -> LayerNorm": layernorm,
    "QK-norm -> none": no_qk_norm,
    "ReLU^2 -> GELU": gelu,
    "untied head -> tied": tied_head,
    "zero init -> GPT-2 init": no_zero_init,
    "softcap -> none": no_softcap,
}


# ---------------------------------------------------------------------------- one run

def fresh_module(name):
    """The stage script imported anew: a swap changes this copy only, never another run's."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"{name}_ladder", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(job):
    """Train one recipe (job: stage, revert, lr, seed, argv, log_dir, opts); its val curve, the
    digest of the train batches it took, and its time. Runs in this process or in a pool worker."""
    import torch
    torch.set_num_threads(1)
    m = fresh_module(job["stage"])
    if job["revert"]:
        REVERTS[job["revert"]](m, job["opts"])
    m.load_hellaswag = lambda *a: None  # no HellaSwag: the val loss is the measure here
    m.save_checkpoint = lambda log_dir, state, saved, last: (saved, None)  # no checkpoints either
    digest, next_batch = hashlib.sha256(), m.DataLoaderLite.next_batch

    def hashed(self):
        x, y = next_batch(self)
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
        return x, y
    m.DataLoaderLite.next_batch = hashed
    argv = job["argv"] + ["--max-lr", str(job["lr"]), "--seed", str(job["seed"]),
                          "--log-dir", job["log_dir"]]
    t0, out = time.time(), io.StringIO()
    with redirect_stdout(out):
        m.main(argv)
    with open(os.path.join(job["log_dir"], "log.txt")) as f:
        rows = [line.split() for line in f if not line.startswith("#")]
    curve = [(int(step), float(value)) for step, kind, value in rows if kind == "val"]
    return {**job, "curve": curve, "final": curve[-1][1], "digest": digest.hexdigest()[:12],
            "seconds": time.time() - t0}


# ---------------------------------------------------------------------------- the ladder

def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def crossing(curve, target):
    """The first (fractional) step count after which the curve (a list of (step, val loss); the val
    loss at step s is after s steps) is at or below target, linearly interpolated; None if never."""
    if curve[0][1] <= target:
        return curve[0][0]
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:  # v0 > target >= v1
            return s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def mean_curve(runs):
    steps = [s for s, _ in runs[0]["curve"]]
    return [(s, statistics.mean(r["curve"][i][1] for r in runs)) for i, s in enumerate(steps)]


def make_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")
    p.add_argument("--data-dir", default=None,
                   help="shards fineweb.py wrote (default: input.txt made into shards)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: one seed, 20 steps, no LR search")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps per run (default 60; --quick 20)")
    p.add_argument("--model", default="4,4,64", help="n_layer,n_head,n_embd (default 4,4,64)")
    p.add_argument("-B", type=int, default=8)
    p.add_argument("-T", type=int, default=32)
    p.add_argument("--lr7", default="2e-3,4e-3,8e-3", help="stage 7's --max-lr values to try")
    p.add_argument("--lr8", default="0.025,0.05,0.1",
                   help="stage 8's --max-lr (Muon's) values to try")
    p.add_argument("--eval-every", type=int, default=None,
                   help="default: steps / 6 (10 for 60 steps)")
    p.add_argument("--val-tokens", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
    p.add_argument("--reverts", default=",".join(REVERTS), help="which changes to revert, by name")
    p.add_argument("--work-dir", default=None,
                   help="where runs write their logs (default: a temporary folder)")
    return p


def make_shards(out_dir):
    """input.txt (tiny Shakespeare, 338,025 tokens) as fineweb.py shards of 32,768 tokens; val: the
    first."""
    proc = subprocess.run([sys.executable, str(ROOT / "fineweb.py"),
                           "--data-files", str(ROOT / "input.txt"), "--out-dir", str(out_dir),
                           "--shard-size", "32768", "--workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1]
        sys.exit(f"error: fineweb.py could not make shards of input.txt: {last}")
    return out_dir


def run_all(jobs, n_parallel):
    if n_parallel <= 1:
        return [run_one(job) for job in jobs]
    with ProcessPoolExecutor(n_parallel, mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_one, jobs))


def main(argv=None):
    args = make_parser().parse_args(argv)
    steps = args.steps or (20 if args.quick else 60)
    seeds = list(range(1 if args.quick else args.seeds))
    lr7 = [float(x) for x in args.lr7.split(",")]
    lr8 = [float(x) for x in args.lr8.split(",")]
    if args.quick:
        lr7, lr8 = [lr7[len(lr7) // 2]], [lr8[len(lr8) // 2]]
    reverts = [r for r in args.reverts.split(",") if r]
    unknown = [r for r in reverts if r not in REVERTS]
    if unknown:
        sys.exit(f"error: --reverts {unknown[0]!r} is not one of: {', '.join(REVERTS)}")
    n_layer, n_head, n_embd = (int(x) for x in args.model.split(","))
    eval_every = args.eval_every or max(1, steps // 6)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ladder_"))
    data_dir = args.data_dir or str(make_shards(work / "shards"))
    empty = work / "no_hellaswag.jsonl"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    # the same for every recipe: the data, its order (the seed), the batch, the steps, the size
    common = ["--device", "cpu", "--dtype", "float32", "--no-compile", "--data-dir", data_dir,
              "-B", str(args.B), "-T", str(args.T), "--total-batch-size", str(args.B * args.T),
              "--steps", str(steps), "--warmup-steps", str(max(1, steps // 15)),
              "--eval-every", str(eval_every),
              "--val-tokens", str(args.val_tokens), "--checkpoint-every", str(10 ** 9),
              "--num-return-sequences", "1", "--max-length", "9", "--hellaswag-file", str(empty),
              "--n-layer", str(n_layer), "--n-head", str(n_head), "--n-embd", str(n_embd)]
    counter = iter(range(10 ** 6))

    def job(stage, lr, seed, revert=None, **opts):
        return {"stage": stage, "revert": revert, "lr": lr, "seed": seed, "argv": common,
                "log_dir": str(work / f"run{next(counter):03d}"), "opts": opts}

    t0 = time.time()
    print(f"# ladder: {n_layer} layers x {n_embd}, B {args.B} T {args.T}, {steps} steps "
          f"({steps * args.B * args.T:,} tokens), seeds {seeds}, data {data_dir}", flush=True)
    # 1. each stage's LR, on the first seed
    tune = [job(STAGE7, lr, seeds[0]) for lr in lr7] + [job(STAGE8, lr, seeds[0]) for lr in lr8]
    runs = run_all(tune, args.jobs)
    for r in runs:
        print(f"run {r['stage'][0]} lr {r['lr']:g} seed {r['seed']}: final val {r['final']:.4f} "
              f"({r['seconds']:.0f} s, batches {r['digest']})", flush=True)
    best7 = min((r for r in runs if r["stage"] == STAGE7), key=lambda r: r["final"])["lr"]
    best8 = min((r for r in runs if r["stage"] == STAGE8), key=lambda r: r["final"])["lr"]
    # 2. the other seeds at the best LRs, and stage 8 with each change reverted, every seed
    more = [job(STAGE7, best7, s) for s in seeds[1:]] + [job(STAGE8, best8, s) for s in seeds[1:]]
    more += [job(STAGE8, best8, s, revert, stage7_lr=best7) for revert in reverts for s in seeds]
    runs += run_all(more, args.jobs)
    for r in runs[len(tune):]:
        revert = f" - {r['revert']}" if r["revert"] else ""
        print(f"run {r['stage'][0]}{revert} lr {r['lr']:g} seed {r['seed']}: final val "
              f"{r['final']:.4f} ({r['seconds']:.0f} s, batches {r['digest']})", flush=True)
    report(runs, best7, best8, reverts, seeds, steps * args.B * args.T, time.time() - t0)
    return runs


def report(runs, best7, best8, reverts, seeds, tokens, seconds):
    def pick(stage, lr, revert=None):
        mine = [r for r in runs if (r["stage"], r["lr"], r["revert"]) == (stage, lr, revert)]
        return sorted(mine, key=lambda r: r["seed"])
    s7, s8 = pick(STAGE7, best7), pick(STAGE8, best8)
    m7, sd7 = mean_std([r["final"] for r in s7])
    print("\n| recipe | --max-lr | final val loss, mean +- std | each seed | vs stage 8 |")
    print("| --- | ---: | ---: | --- | ---: |")
    m8, _ = mean_std([r["final"] for r in s8])
    rows = [("stage 7 (GPT-2, AdamW)", s7), ("stage 8 (all changes)", s8)]
    rows += [(f"stage 8, {revert}", pick(STAGE8, best8, revert)) for revert in reverts]
    for name, rs in rows:
        m, sd = mean_std([r["final"] for r in rs])
        each = " ".join(f"{r['final']:.4f}" for r in rs)
        print(f"| {name} | {rs[0]['lr']:g} | {m:.4f} +- {sd:.4f} | {each} | {m - m8:+.4f} |")
    target_step = crossing(mean_curve(s8), m7)
    # stage 7's final val loss is measured as its last step starts: after that many steps' tokens
    fraction = None if target_step is None else target_step / s7[0]["curve"][-1][0]
    worst8, best7_final = max(r["final"] for r in s8), min(r["final"] for r in s7)
    print(f"\nstage 8's worst seed {worst8:.4f} vs stage 7's best {best7_final:.4f}: "
          f"{'below' if worst8 < best7_final else 'NOT below'} (goal: below)")
    reached = ("more than all of stage 7's tokens" if fraction is None else
               f"{fraction:.2f} of stage 7's tokens (goal: at most 0.60)")
    print(f"tokens-to-target: stage 8 reaches stage 7's final mean val loss {m7:.4f} "
          f"after {reached}")
    print("\n| after step | stage 7, mean val loss | stage 8, mean val loss |")
    print("| ---: | ---: | ---: |")
    for (step, v7), (_, v8) in zip(mean_curve(s7), mean_curve(s8)):
        print(f"| {step} | {v7:.4f} | {v8:.4f} |")
    digests = {}  # the data order is the seed's: at one seed, every recipe takes the same batches
    for r in runs:
        digests.setdefault(r["seed"], set()).add(r["digest"])
    same = all(len(d) == 1 for d in digests.values())
    each = ", ".join(f"seed {seed} {' '.join(sorted(d))}" for seed, d in sorted(digests.items()))
    verdict = "at each seed the same for every recipe" if same else "DIFFER between recipes"
    print(f"train batches: {verdict} "
          f"({len(runs)} runs, {tokens:,} tokens each; {each}); {seconds / 60:.1f} min")
    return fraction


if __name__ == "__main__":
    main()
