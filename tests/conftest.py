"""Shared test helpers: import a numbered script, run it as a subprocess, make tiny models.

Every test runs on CPU, offline, with a tiny model (2 layers, 2 heads, 32 dims) and data made
in tmp_path. Helpers live here once; test files import them with `from conftest import ...`.
"""
import importlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, before numpy and torch start theirs
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# offline GPT-2 BPE files: a copy inside the repo (git-ignored; it travels to a GPU machine with the working
# tree, see benchmarks/gpu_check.py), else this workplace's shared one
for cache in (ROOT / ".tiktoken_cache", ROOT.parent / "shared" / "tiktoken_cache"):
    if "TIKTOKEN_CACHE_DIR" not in os.environ and cache.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries in tests
# one thread, as child_env gives each subprocess: a tiny model gains nothing from more, and a run in this
# process then computes exactly what the same run in a subprocess does (the same summation order)
torch.set_num_threads(1)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.gpu_check import parse_steps  # noqa: E402  (the step lines as dicts: said once, there)

SCRIPTS = [
    "0_gpt2_model", "1_gpt2_hf_eval", "2_train_overfit", "3_train_dataloader",
    "4_train_init", "5_train_speedup", "6_train_hyperparams", "7_train_ddp_fineweb",
]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]  # the tiny model every CPU test uses


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run them with `python -m pytest -m gpu`")
    config.addinivalue_line("markers", "slow: starts a training subprocess or torchrun; the contributor's tier "
                            "`python -m pytest -m \"not slow\"` leaves it out")


@pytest.fixture(autouse=True)
def signal_handlers_put_back():
    """A stage-7 main() called in this process installs its signal handlers, and one that stops with an
    error (sys.exit) leaves them: after each test, the handlers are what they were before it."""
    import signal
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    before = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in names}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def child_env(**extra):
    """The environment of a subprocess a test starts: unbuffered output, and one thread per process.
    A tiny model gains nothing from a second thread, and on a busy 2-core machine the threads of two
    processes (torchrun's ranks, or a test beside another) fight over the cores: 53 s instead of 92."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def existing(names):
    """The numbered scripts among `names` that exist in this checkout (later stages land later)."""
    return [n for n in names if (ROOT / f"{n}.py").exists()]


def load(name):
    """Import a numbered script (its name starts with a digit, so no plain `import`)."""
    return importlib.import_module(name)


def load_fresh(name):
    """A new copy of a numbered script, its imports run again now (a test that changes what torch has
    sees how the script copes); load(name)'s cached module is left as it was."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_fresh", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args, env=None, timeout=600, cmd=None):
    """Run `python NAME.py ARGS` (or `cmd + ARGS`) from the repo root; return the CompletedProcess."""
    full_env = child_env(**(env or {}))
    command = (cmd or [sys.executable, str(ROOT / f"{name}.py")]) + [str(a) for a in args]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_here(module, *args):
    """main(ARGS) of a numbered script or tool (a module or its name) in this process, as run_script runs
    it in a subprocess: a CompletedProcess with the exit code, stdout and stderr (sys.exit's message last,
    as Python prints it). Not for a run that forks workers (fineweb.py --workers 2): a fork of this process,
    whose other threads may hold a lock at that instant, can hang; run_script starts it in a fresh one."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    module = load(module) if isinstance(module, str) else module
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            module.main([str(a) for a in args])
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else (e.code or 0)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    return subprocess.CompletedProcess([module.__name__, *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_clean_error(proc, *needles):
    """A user mistake: non-zero exit, no traceback, and a last stderr line that says `error`
    and contains every needle."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error" in last and all(n in last for n in needles), proc.stderr


def main_error(module, argv):
    """Call main(argv) of a script (a module or its name) in this process; it must stop with one
    `error: ...` line (sys.exit's message). Returns that line."""
    module = load(module) if isinstance(module, str) else module
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    message = e.value.code
    assert isinstance(message, str) and "error: " in message and "\n" not in message, message
    return message


def main_steps(module, argv):
    """Call a stage's main(argv) in this process; return (its stdout, its parsed step lines)."""
    out, rows, _ = main_losses(module, argv)
    return out, rows


def main_losses(module, argv):
    """main_steps, and what main returns too: each step's loss at full precision (step lines print 6 decimals)."""
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        losses = module.main([str(a) for a in argv])
    return out.getvalue(), parse_steps(out.getvalue()), losses


def make_hf_model(n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0):
    """A random small GPT2LMHeadModel whose biases and LayerNorms are non-zero too (so a
    forgotten bias or a missed transpose shows up as a logit difference)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=50257)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """Directory written by GPT2LMHeadModel.save_pretrained for a tiny random model."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    make_hf_model().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def write_shards(data_dir, sizes, seed=0):
    """Synthetic uint16 shards in fineweb.py's layout: shard 0 is val, the rest train; a
    document starts every 97 tokens with <|endoftext|> (50256)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, size in enumerate(sizes):
        tokens = rng.integers(0, 50256, size=size).astype(np.uint16)
        tokens[::97] = 50256
        np.save(data_dir / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy", tokens)
    return data_dir


# ---------------------------------------------------------------------------- HellaSwag-format data

WORDS = ("the man woman dog ball kitchen slowly quickly picks up puts down runs jumps over "
         "a an small red green bowl of water knife cuts bread then he she they smiles").split()


def phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def make_examples(n=12, seed=0):
    """n examples in the official jsonl format, with context and ending lengths that vary so
    that rows of one example, and examples of one batch, need different amounts of padding."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        ctx_a, ctx_b = phrase(rng, rng.randint(3, 14)) + ".", phrase(rng, rng.randint(0, 4)).lower()
        examples.append({
            "ind": i, "activity_label": "Making a sandwich", "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "split": "val",
            "split_type": "indomain" if i % 2 else "zeroshot", "source_id": f"synthetic~{i}",
            "endings": [phrase(rng, rng.randint(1, 12)).lower() + "." for _ in range(4)],
            "label": rng.randrange(4),
        })
    return examples


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return path


def write_hub_format(path, examples):
    """The examples as the hub dataset Rowan/hellaswag has them (label a string, "3"), in a .jsonl
    or a .parquet file, whichever path's suffix says."""
    rows = [{**ex, "label": str(ex["label"])} for ex in examples]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    return write_jsonl(path, rows)


# ---------------------------------------------------------------------------- stage 7: runs, checkpoints

STAGE7 = "7_train_ddp_fineweb"
# torchrun as `python -m torch.distributed.run`: the same program, found where `torchrun` is not on PATH
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# float32 and eager, so that 1 and 2 processes differ only in summation order; one 1-token sample per
# evaluation (a test that looks at samples asks for more: a later flag wins)
RUN7 = TINY + ["--device", "cpu", "-B", "2", "-T", "32", "--total-batch-size", "256", "--dtype", "float32",
               "--no-compile", "--eval-every", "1000", "--val-tokens", "256", "--num-return-sequences", "1",
               "--max-length", "9"]


def run7(*args, nproc=1, **kw):
    """Stage 7 on the tiny model, in this process (run_here: a subprocess would add only its start-up) or
    under torchrun (nproc=2); it must succeed. Without a --hellaswag-file, an empty one, so that a HellaSwag
    copy someone has in their `datasets` cache cannot change what a test sees. Returns (proc, step rows)."""
    if "--hellaswag-file" not in args:
        empty = Path(args[args.index("--data-dir") + 1]).parent / "no_hellaswag.jsonl"
        empty.write_text("")
        args += ("--hellaswag-file", empty)
    if nproc == 1:
        proc = run_here(STAGE7, *RUN7, *args)
    else:
        proc = run_script(STAGE7, *RUN7, *args, cmd=TORCHRUN + [f"{STAGE7}.py"], **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, parse_steps(proc.stdout)


@pytest.fixture(scope="session")
def stage7_run(tmp_path_factory):
    """The log dir of a real tiny stage-7 run: 4 steps, val loss and HellaSwag (6 examples) at
    steps 0, 2 and 3, checkpoint model_00004.pt; shared by the plot and export tests."""
    root = tmp_path_factory.mktemp("stage7_run")
    shards = write_shards(root / "shards", [3001, 5003, 4099])
    hella = write_jsonl(root / "hellaswag_val.jsonl", make_examples(6))
    run7("--data-dir", shards, "--log-dir", root / "log", "--steps", "4", "--eval-every", "2",
         "--hellaswag-file", hella, "--hellaswag-limit", "0")
    return root / "log"


def signal_run(args, signals, nproc=1, pause=0.1, delay=0.0):
    """Start stage 7 (under torchrun when nproc == 2), wait for its first step line and `delay` seconds, then
    send `signals` `pause` seconds apart (to torchrun itself, which passes them on to its workers)."""
    script = TORCHRUN + [f"{STAGE7}.py"] if nproc == 2 else [sys.executable, str(ROOT / f"{STAGE7}.py")]
    cmd = script + [str(a) for a in RUN7 + list(args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("step "):
            break
    for i, sig in enumerate(signals):
        time.sleep(pause if i else delay)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(head) + out, err)


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """Six uninterrupted steps, checkpoints after 3 and 6: the losses that a stopped and resumed run
    must reproduce. Returns (the arguments of that run, its step rows, its log dir)."""
    tmp = tmp_path_factory.mktemp("straight")
    shards = write_shards(tmp / "shards", [3001, 5003, 4099, 6007, 2999])
    (tmp / "no_hellaswag.jsonl").write_text("")
    _, rows = run7("--data-dir", shards, "--log-dir", tmp / "log", "--steps", "6", "--checkpoint-every", "3")
    return ["--data-dir", shards, "--hellaswag-file", tmp / "no_hellaswag.jsonl", "--steps", "6"], rows, tmp / "log"


def write_checkpoint(path, seed=0):
    """A checkpoint as stage 7 saves one, of a tiny random GPT (vocab padded to 50304) whose
    biases and LayerNorms are non-zero (a forgotten bias or transpose shows in the logits) and
    whose 47 padding rows of wte/lm_head are large, so that scoring or exporting them by mistake
    changes the answers. Returns the model."""
    from dataclasses import asdict
    m = load(STAGE7)
    torch.manual_seed(seed)
    model = m.GPT(m.GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
        model.lm_head.weight[50257:].normal_(0.0, 1.0)  # 50x the real rows' std 0.02
    optimizer = model.configure_optimizers(0.1, 6e-4, "cpu", log=lambda *a: None)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(model.config),
                "step": 4, "val_loss": 10.9, "loader": {"epoch": 0, "shard": 0, "position": 1024},
                "rng": {"cpu": torch.get_rng_state()}}, path)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(path, model): a checkpoint written by write_checkpoint, and the GPT it holds."""
    path = tmp_path_factory.mktemp("checkpoint") / "model_00004.pt"
    return path, write_checkpoint(path)


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    """The folder `python export_hf.py CHECKPOINT OUT_DIR` writes for that checkpoint."""
    out = tmp_path_factory.mktemp("export") / "gpt2-ours"
    proc = run_here("export_hf", checkpoint[0], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
