"""The GPU check: one command that measures what this repository claims about a GPU.

On one NVIDIA GPU, offline and without `datasets`, within `--budget-s` (480 s: 8 minutes on an
H100, first compilations included; an H200 is faster), it measures, in this order (what a GPU
owner needs most comes first; each part in its own subprocess):
  versions  python, torch, CUDA, driver, the GPU's name and memory, its peak for MFU (seconds)
  stage7    7_train_ddp_fineweb.py at the full-run setting (124M, T=1024, compile on) at the -B
            that fits (64 where it does; an out-of-memory line halves it), 12 steps on shards it
            makes (make_bench_shards.py): tok/s, MFU, hours of the 10B-token run on 1 and 8 GPUs
  speed     the lecture's table, bench_speedup.py -B 16 -T 1024: fp32 -> TF32 -> bf16 -> compile
            -> flash -> 50304 -> fused AdamW, with ms/step, tok/s, MFU and compile seconds
  memory    peak memory of the training step by -B, eager and compiled (bench_memory.py), and
            from it the largest -B for 8-80 GB GPUs
  pytest    `python -m pytest -m gpu` (in parallel where pytest-xdist is there; the out-of-memory
            test alone, afterwards, since it fills the GPU)
Each part gets a share of the budget (SHARES; what an earlier part leaves unused goes to the
next), so the caps add up to the budget. A part that reaches its cap is stopped and reports
what it measured so far; report.md's first line says which parts were cut, skipped or failed.
report.md and each part's raw output are written as each part ends; Ctrl-C (or SIGTERM) stops
the part running and still writes the report of what was measured.

    python benchmarks/gpu_check.py                   # -> benchmarks/results/gpu_check_<gpu>_<date>/
    python benchmarks/gpu_check.py --out DIR --parts stage7,memory --budget-s 300
    python benchmarks/gpu_check.py --prepare         # GPT-2's BPE files -> .tiktoken_cache/

Without CUDA it rehearses the same sequence on the CPU with a tiny model (2 layers, 32 dims,
small B and T): every code path runs, the figures are not GPT-2 124M's.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
from mfu import flops_per_token, peak_tflops  # noqa: E402

# measured in this order: what a GPU owner needs most comes first
PARTS = ("stage7", "speed", "memory", "pytest")
BUDGET_S = 480  # 8 minutes on one H100, first compilations included (a guess until a GPU ran it)
VERSIONS_CAP = 60  # the probe (seconds; always runs: the device decides everything else)
# each part's share of the budget left after the probe; a part's cap is its share plus whatever the
# parts before it left unused, so the last cap ends at the budget. Guesses for an H100, to be
# replaced by measurements: stage 7 ~130 s (compiling the step and the evaluation, 12 steps of
# ~1.3 s), the speed table ~150 s (four compilations of 124M), memory ~90 s (one dynamic-batch
# compilation), the GPU tests ~80 s (three compiled tiny runs in parallel, then the OOM test)
SHARES = {"stage7": 0.30, "speed": 0.32, "memory": 0.20, "pytest": 0.18}
MIN_PART_S = {"gpu": 20, "cpu": 2}  # a smaller cap: the part is skipped (it would measure nothing)
STEPS = {"gpu": 12, "cpu": 6}  # stage 7's steps: the median is over those after the first 3
FULL_RUN_STEPS, TOKENS_PER_STEP, T_FULL = 19073, 524288, 1024  # the lecture's 10B-token run
CARDS_GB = (8, 12, 16, 24, 40, 80)
CONTEXT_GIB = 0.5  # the CUDA context and libraries' workspaces, outside PyTorch's caching allocator
# a GPU sold as N GB gives CUDA ~0.94-1.0 x N GiB (16 GB T4: 15.0 GiB; 24 GB 4090: 23.6 GiB)
USABLE = 0.94
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
GPU_TESTS = "tests/test_gpu.py"  # every `gpu` test lives there (collecting only it is faster)
OOM_TEST = "test_out_of_memory_line_on_cuda"
GIB = 2**30
# tiktoken caches each download under its URL's sha1: gpt-2/encodings/main/vocab.bpe, encoder.json
BPE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
BPE_CACHE = ROOT / ".tiktoken_cache"
BPE_ERROR = ("error: GPT-2's BPE files not found: set TIKTOKEN_CACHE_DIR, or copy them into "
             ".tiktoken_cache/ (`python benchmarks/gpu_check.py --prepare` where they are; see "
             "docs/hardware.md)")
RAW_FILES = {"stage7": "stage7.txt", "speed": "speed.txt", "memory": "memory.txt",
             "pytest": "pytest.txt"}
TITLES = {"stage7": "Stage 7 at the full-run setting", "speed": "The lecture's speed table",
          "memory": "Memory by -B", "pytest": "pytest -m gpu"}
STEP_LINE = re.compile(r"^step\s+(\d+) \| (.*)$")
MEM_ROW = re.compile(r"^\| (eager|compile) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) "
                     r"\| ([\d.]+) \|$")
MEM_STOP = re.compile(r"^(stop|OOM|error) (eager|compile): (.*)$")
OOM_LINE = re.compile(r"error: out of memory at -B (\d+)")
TEST_RESULT = re.compile(r"(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|"
                         r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(tests/\S+::\S+)")
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


# ---------------------------------------------------------------------------- derived figures


def largest_batch(reserved_gib, card_gib, context_gib=CONTEXT_GIB, usable=USABLE, max_batch=512):
    """The largest power-of-two -B (so that it divides 524,288 / 1024 = 512) whose measured peak
    reserved memory (GiB, by B) plus the context fits `usable` x card_gib. Returns (B, exact): B is
    None when not even the smallest measured B fits; exact is False when the largest measured B
    fits, so an unmeasured larger one might too."""
    fits = lambda b: reserved_gib[b] + context_gib <= usable * card_gib  # noqa: E731
    measured = sorted(b for b in reserved_gib if b & (b - 1) == 0 and max_batch % b == 0)
    best = None
    for b in measured:  # all B up to the answer must fit (memory grows with B)
        if not fits(b):
            break
        best = b
    return best, best is None or best != measured[-1] or best == max_batch


def run_hours(tok_per_s, gpus=1, steps=FULL_RUN_STEPS, tokens_per_step=TOKENS_PER_STEP):
    """Hours of the full run at tok_per_s per GPU, on `gpus` GPUs scaling linearly (an
    assumption)."""
    return steps * tokens_per_step / (tok_per_s * gpus) / 3600


def parse_steps(text):
    """Step lines ('step n | loss x | name value | ...') as dicts."""
    rows = []
    for line in text.splitlines():
        m = STEP_LINE.match(line.strip())
        if m:
            row = {"step": int(m.group(1))}
            for field in m.group(2).split(" | "):
                key, _, value = field.rpartition(" ")
                try:
                    row[key] = float(value)
                except ValueError:
                    pass
            rows.append(row)
    return rows


def median_after(rows, key, skip=3):
    """The median of a step-line field over the steps after the first `skip` (compilation, warm-up);
    over all steps when there are no more than `skip`."""
    values = [r[key] for r in rows if key in r]
    values = values[skip:] or values
    return statistics.median(values) if values else None


def parse_memory(text):
    """bench_memory.py's output: ({mode: {B: (allocated GiB, reserved GiB, first step s)}},
    stop lines, context GiB)."""
    rows, stops, context = {"eager": {}, "compile": {}}, [], None
    for line in text.splitlines():
        if m := MEM_ROW.match(line.strip()):
            rows[m.group(1)][int(m.group(2))] = tuple(float(m.group(k)) for k in (3, 4, 5))
        elif MEM_STOP.match(line.strip()):
            stops.append(line.strip())
        elif m := re.match(r"^context: ([\d.]+) GiB", line.strip()):
            context = float(m.group(1))
    return rows, stops, context


def parse_pytest(text):
    """(the summary line, its counts, the FAILED/ERROR test ids) of a pytest run's output."""
    summary, counts = "", {}
    for line in text.splitlines():
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b",
                           line)
        if found and re.search(r" in [\d.]+s", line):
            summary = line.strip(" =")
            counts = {"error" if k.startswith("error") else k: int(n) for n, k in found}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    return summary, counts, failed


def parse_progress(text):
    """{test id: outcome} from `pytest -v` lines (with or without pytest-xdist's [gwN] prefix):
    what a run stopped before its summary line had measured."""
    done = {}
    for m in TEST_RESULT.finditer(text):
        test, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        done.setdefault(test, outcome)
    return done


def fmt_b(best):
    b, exact = best
    return "none" if b is None else str(b) if exact else f">= {b}"


# ---------------------------------------------------------------------------- BPE files


def bpe_dir(env):
    """The folder tiktoken reads its cache from, under this environment."""
    return Path(env.get("TIKTOKEN_CACHE_DIR") or env.get("DATA_GYM_CACHE_DIR")
                or Path(tempfile.gettempdir()) / "data-gym-cache")


def bpe_present(folder):
    return all((Path(folder) / name).is_file() for name in BPE_FILES)


def prepare(dest=BPE_CACHE, source=None):
    """Copy GPT-2's two BPE files from tiktoken's cache (which, with internet, tiktoken fills first)
    into `dest`, a folder that travels with the repository (git ignores it)."""
    if source is None:
        source = bpe_dir(os.environ)
        if not bpe_present(source):
            try:  # online, this downloads them into `source`
                import tiktoken
                tiktoken.get_encoding("gpt2")
            except Exception as e:  # noqa: BLE001 - offline: requests' ConnectionError, and more
                sys.exit(f"{BPE_ERROR} [looked in {source}; downloading failed: "
                         f"{type(e).__name__}]")
    source, dest = Path(source), Path(dest)
    if not bpe_present(source):
        sys.exit(f"{BPE_ERROR} [looked in {source}]")
    dest.mkdir(parents=True, exist_ok=True)
    for name in BPE_FILES:
        shutil.copyfile(source / name, dest / name)  # no mode: a writable copy of a read-only file
    size = sum((dest / n).stat().st_size for n in BPE_FILES)
    print(f"copied GPT-2's BPE files ({size / 1e6:.1f} MB) from {source} to {dest}; gpu_check.py "
          "and the tests read them there when TIKTOKEN_CACHE_DIR is unset (carry that folder to "
          "an offline GPU box)")
    return dest


# ---------------------------------------------------------------------------- the probe (versions)


def probe(peak_override):
    """Print versions and the device, then one line 'GPU_CHECK_PROBE {json}' for the parent."""
    import importlib.metadata as md
    import importlib.util
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "mps_available": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine()}
    for pkg in ("numpy", "tiktoken", "transformers", "triton", "pytest", "pytest-xdist",
                "pytest-timeout", "datasets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info["xdist"] = importlib.util.find_spec("xdist") is not None
    info["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
    info["cudnn"] = torch.backends.cudnn.version() if info["cuda_available"] else None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,"
                                "power.limit,clocks.max.sm", "--format=csv"],
                               capture_output=True, text=True, timeout=30)
            print(q.stdout.strip())
            lines = q.stdout.strip().splitlines()
            info["driver"] = lines[1].split(", ")[1] if len(lines) > 1 else None
            print(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired, IndexError) as e:
            print(f"nvidia-smi failed: {type(e).__name__}")
    info["nvidia_smi"] = bool(smi)
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                    memory_gib=p.total_memory / GIB,
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    try:  # the stage scripts' table: {GPU-name substring: dense bf16 (fp16) TFLOP/s}
        import importlib
        table = importlib.import_module("5_train_speedup").PEAK_TFLOPS
        name = info.get("gpu") or ""
        info["peak_key"] = next((k for k in table if k in name), None) if name else None
        info["peak_tflops"] = (peak_tflops(name, table, peak_override)
                               if name or peak_override else None)
    except Exception as e:  # noqa: BLE001 - a stage script mid-edit must not lose the versions
        info["peak_tflops"], info["peak_error"] = peak_override, f"{type(e).__name__}: {e}"
    folder = bpe_dir(os.environ)
    info["bpe_dir"] = str(folder)
    info["bpe"] = bpe_present(folder)
    if not info["bpe"]:
        import socket
        socket.setdefaulttimeout(15)  # offline, fail fast instead of hanging on a connection
        try:
            import tiktoken
            tiktoken.get_encoding("gpt2")  # with internet: downloads them into tiktoken's cache
            info["bpe"] = True
        except Exception as e:  # noqa: BLE001
            info["bpe_error"] = f"{type(e).__name__}"
    for key, value in info.items():
        print(f"{key}: {value}")
    print("GPU_CHECK_PROBE " + json.dumps(info), flush=True)


# ---------------------------------------------------------------------------- running parts


def kill_tree(proc):
    """SIGKILL the part's process group (torchrun's and pytest-xdist's workers too)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd, raw, timeout, env, poll=None, should_stop=None):
    """Run cmd with stdout and stderr going, line by line as they come, to the open file `raw`.
    It is killed (with its process group) at `timeout` seconds, or as soon as should_stop()
    says so (a Ctrl-C). Returns rc (None if killed), stopped (True if should_stop ended it),
    seconds, the output text and each line's time."""
    raw.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
    raw.flush()
    t0 = time.time()
    # a process group of its own: a Ctrl-C in the terminal reaches gpu_check only, which then
    # stops the part itself (and whatever ends gpu_check's session does not end it half-way)
    group = {} if not hasattr(os, "killpg") else {"process_group": 0} \
        if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            **group)
    lines = []

    def pump():
        for line in proc.stdout:
            raw.write(line)
            raw.flush()
            lines.append((time.time() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = stopped = False
    next_poll = t0 + 2
    try:
        while True:
            try:
                proc.wait(timeout=max(0.01, min(0.25, t0 + timeout - time.time())))
                break
            except subprocess.TimeoutExpired:
                stopped = bool(should_stop and should_stop())
                if stopped or time.time() >= t0 + timeout:
                    killed = True
                    kill_tree(proc)
                    proc.wait()
                    break
                if poll and time.time() >= next_poll:
                    poll()
                    next_poll = time.time() + 2
    except BaseException:  # a second Ctrl-C: leave nothing running on the GPU
        kill_tree(proc)
        raise
    reader.join(timeout=10)
    seconds = time.time() - t0
    why = " (stopped: Ctrl-C)" if stopped else f" (killed at its {timeout:.0f} s limit)" \
        if killed else ""
    raw.write(f"# exit {proc.returncode}{why} after {seconds:.1f} s\n\n")
    raw.flush()
    return SimpleNamespace(rc=None if killed else proc.returncode, stopped=stopped,
                           seconds=seconds, timeout=timeout, lines=lines,
                           text="\n".join(line for _, line in lines))


def show(cmd, tmp=None):
    """A command as a reader would type it: python, paths from the repository root, $TMP for the
    scratch folder."""
    words = []
    for c in map(str, cmd):
        if c == sys.executable:
            c = "python"
        elif tmp and c.startswith(str(tmp)):
            c = "$TMP" + c[len(str(tmp)):]
        elif c.startswith(str(ROOT) + os.sep):
            c = os.path.relpath(c, ROOT)
        words.append(c if c.startswith("$TMP") and shlex.quote(c[4:]) == c[4:] else shlex.quote(c))
    return " ".join(words)


def status(r):
    if r.stopped:
        return "stopped (Ctrl-C)"
    return f"killed at its {r.timeout:.0f} s limit" if r.rc is None else f"exit {r.rc}"


def outcome(body, figures=(), state="ok", note=""):
    """What a part returns: its report section, its figures, and ok / cut / failed with a note
    for the report's first line."""
    return SimpleNamespace(body=body, figures=list(figures), state=state, note=note)


class Report:
    """report.md, rewritten whole after every part: a kill leaves everything so far, and its
    first line (headline()) always says what is complete and what is not."""

    def __init__(self, path, title, meta, headline):
        self.path, self.title, self.meta, self.headline = Path(path), title, meta, headline
        self.sections, self.figures = [], []

    def add(self, title, body, figures=()):
        self.sections.append(f"## {title}\n\n{body.strip()}\n")
        self.figures += list(figures)
        self.write()

    def text(self, footer=""):
        text = f"# {self.title}: {self.headline()}\n\n{self.meta}\n\n" + "\n".join(self.sections)
        if self.figures:
            text += "\n## Figures\n\n| figure | value |\n| --- | --- |\n"
            text += "".join(f"| {name} | {value} |\n" for name, value in self.figures)
        return text + footer

    def write(self, footer=""):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.text(footer))
        os.replace(tmp, self.path)


def out_folder(path, flag="--out"):
    """Make the report's folder, or stop with one line before any work: `path` is a file, cannot be
    created or written, or already holds a check's report (which this one would overwrite)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        sys.exit(f"error: {flag} {path} is a file; pass a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe_file = tempfile.mkstemp(dir=folder, prefix=".gpu_check_write_test_")
        os.close(fd)
        os.unlink(probe_file)
    except OSError as e:
        sys.exit(f"error: {flag} {path}: cannot write there ({e.strerror or type(e).__name__}); "
                 "pass a folder you can write to")
    if (folder / "report.md").exists():
        sys.exit(f"error: {flag} {path} already holds a GPU check's report.md; pass a new folder "
                 "(nothing there was changed)")
    return folder


class Check:
    def __init__(self, args, argv=()):
        self.args, self.argv, self.t0 = args, list(argv), time.time()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "TIKTOKEN_CACHE_DIR" not in self.env and bpe_present(BPE_CACHE):
            self.env["TIKTOKEN_CACHE_DIR"] = str(BPE_CACHE)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        # cold compiles, every run: the compile seconds are a first run's
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.tmp / "inductor"))
        self.info, self.out, self.report, self.deadline = {}, None, None, None
        self.states = {}  # part -> (state, note): ok / cut / failed / skipped
        self.caps = {}  # part -> the seconds it was given (its share and what earlier parts left)
        self.running = None  # the part running now
        self.stop_signal = None  # Ctrl-C / SIGTERM: the part running stops, the report is written
        self.finished = False

    def say(self, text):
        print(f"[{time.time() - self.t0:5.0f} s] {text}", flush=True)

    def run(self, cmd, raw, timeout, poll=None):
        """`run` under this part's cap and the stop signal; starts nothing once stopped."""
        timeout = min(timeout, self.deadline - time.time()) if self.deadline else timeout
        if self.stop_signal:
            raw.write(f"$ {shlex.join(str(c) for c in cmd)}\n# not started: stopped\n\n")
            return SimpleNamespace(rc=None, stopped=True, seconds=0.0, timeout=timeout, lines=[],
                                   text="")
        return run(cmd, raw, max(0.01, timeout), self.env, poll, lambda: bool(self.stop_signal))

    # ------------------------------------------------------------------ the report's first line

    def headline(self):
        """ok only when every part is complete; else each part that is not, and why."""
        requested = [p for p in PARTS if p in self.args.parts]
        states = {p: self.states.get(p, ("not run yet", "")) for p in requested}
        if "versions" in self.states:
            states = {"versions": self.states["versions"], **states}
        if "bpe" in self.states:
            states["BPE files"] = self.states["bpe"]
        bad = [f"{p} {s}" + (f" ({n})" if n else "") for p, (s, n) in states.items() if s != "ok"]
        good = [p for p, (s, _) in states.items() if s == "ok" and p != "versions"]
        missing = [p for p in PARTS if p not in requested]
        if self.stop_signal:
            head = f"STOPPED by {self.stop_signal} during {self.running or 'the check'}: "
        elif not self.finished:
            head = "NOT FINISHED (still running, or killed before its end): "
        elif bad:
            head = "NOT COMPLETE: "
        elif missing:  # complete, but not every part was asked for
            head = "PARTIAL: "
        else:
            return f"ok: all {len(PARTS)} parts complete ({', '.join(PARTS)})"
        rest = bad + ([f"not requested (--parts): {', '.join(missing)}"] if missing else [])
        rest += [f"complete: {', '.join(good)}"] if good else []
        return head + "; ".join(rest)

    # ------------------------------------------------------------------ versions

    def versions(self):
        """Run the probe; set self.info, self.device, self.full, self.gib. Returns the raw file."""
        path = self.tmp / "versions.txt"
        with open(path, "w") as raw:
            cmd = [sys.executable, __file__, "--probe"]
            cmd += ["--peak-tflops", self.args.peak_tflops] if self.args.peak_tflops else []
            r = self.run(cmd, raw, VERSIONS_CAP)
        m = re.search(r"^GPU_CHECK_PROBE (.*)$", r.text, re.M)
        self.info = json.loads(m.group(1)) if m else {}
        self.versions_run = r
        want = self.args.device
        cuda, mps = self.info.get("cuda_available"), self.info.get("mps_available")
        if m and want == "cuda" and not cuda:
            sys.exit(f"error: --device cuda: torch sees no CUDA GPU here (see {path})")
        if m and want == "mps" and not mps:
            sys.exit("error: --device mps: torch sees no Apple GPU here")
        self.device = "cuda" if want in ("auto", "cuda") and cuda else \
            "mps" if want == "mps" and mps else "cpu"
        self.set_device()
        return path

    def set_device(self):
        self.full = self.device != "cpu"  # full sizes on a GPU; a tiny model in the CPU rehearsal
        if not self.full:  # one thread per process: a tiny model gains nothing from more, and a
            self.env.setdefault("OMP_NUM_THREADS", "1")  # busy machine slows oversubscribed ones
        self.gib = self.info.get("memory_gib") if self.device == "cuda" else None

    def versions_section(self):
        i, r = self.info, self.versions_run
        if not i:
            return f"the probe failed ({status(r)}): see versions.txt", []
        lines = [f"- python {i['python']} | torch {i['torch']} | CUDA {i.get('cuda')} | cuDNN "
                 f"{i.get('cudnn')} | triton {i.get('triton')} | driver {i.get('driver')} | numpy "
                 f"{i.get('numpy')} | tiktoken {i.get('tiktoken')} | transformers "
                 f"{i.get('transformers')} | datasets {i.get('datasets')}"]
        if self.device == "cuda":
            lines.append(f"- GPU: {i['gpu']} ({i['gpu_count']} visible), {i['memory_gib']:.1f} "
                         "GiB, "
                         f"compute capability {i['capability']}, {i['sms']} SMs, native bf16: "
                         f"{'yes' if i['bf16_native'] else 'no'}")
        else:
            lines.append(f"- device: {self.device} ({i['machine']}, {i['cpus']} CPUs); no CUDA "
                         "GPU: " + ("full sizes on mps" if self.full else
                                    "CPU rehearsal with a tiny model"))
        peak = i.get("peak_tflops")
        src = "--peak-tflops" if self.args.peak_tflops else \
            f"the stage scripts' PEAK_TFLOPS['{i.get('peak_key')}']"
        lines.append(f"- peak for MFU: {peak:g} TFLOP/s ({src})" if peak else
                     "- peak for MFU: unknown (this device is not in PEAK_TFLOPS; pass "
                     "--peak-tflops)")
        if i.get("peak_error"):
            lines[-1] += f"; the lookup failed: {i['peak_error']}"
        lines.append(f"- pytest {i.get('pytest')} | pytest-xdist {i.get('pytest-xdist')} | "
                     f"pytest-timeout {i.get('pytest-timeout')} | GPT-2's BPE files: "
                     + ("found" if i.get("bpe") else "MISSING") + f" ({i.get('bpe_dir')})")
        figures = [("python", i["python"]), ("torch", i["torch"]), ("CUDA", i.get("cuda")),
                   ("driver", i.get("driver")), ("device", i.get("gpu") or self.device.upper()),
                   ("GPU memory GiB", f"{i['memory_gib']:.1f}" if self.device == "cuda" else "-"),
                   ("peak TFLOP/s for MFU", f"{peak:g}" if peak else "-")]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ stage 7

    def stage7_batch(self):
        """-B for stage 7 on this GPU: 64 (the lecture's) where docs/hardware.md's estimate says it
        fits (2.5 GB + 0.85 GB per sequence), else the largest power of two that does; an
        out-of-memory line then halves it (see stage7)."""
        if self.args.stage7_batch:
            return self.args.stage7_batch, "--stage7-batch"
        if not self.full:
            return 2, "CPU rehearsal"
        if self.gib:
            b = 64
            while b > 1 and 2.5 + 0.85 * b > 0.9 * self.gib * GIB / 1e9:
                b //= 2
            return b, "the largest <= 64 that docs/hardware.md's memory estimate fits on this GPU"
        return 16, "no memory figure (mps)"

    def steps(self):
        return self.args.steps or STEPS["gpu" if self.full else "cpu"]

    def stage7(self, raw):
        shards, empty = self.tmp / "shards", self.tmp / "no_hellaswag.jsonl"
        empty.write_text("")
        make = [sys.executable, HERE / "make_bench_shards.py", "--out-dir", shards]
        if not self.full:
            make += ["--shard-size", "200000", "--val-size", "20000"]
        self.say(f"stage7: {show(make, self.tmp)}")
        r0 = self.run(make, raw, 120)
        if r0.rc != 0:
            return outcome(f"make_bench_shards.py: {status(r0)}: see stage7.txt", [],
                           "cut" if r0.rc is None else "failed", f"making shards: {status(r0)}")
        B, why = self.stage7_batch()
        T, steps = (T_FULL if self.full else 64), self.steps()
        oom = []
        while True:
            cmd, r, rows, used = self.stage7_run(B, T, steps, shards, empty, why, raw)
            m = OOM_LINE.search(r.text) if r.rc not in (0, None) else None
            left = self.deadline - time.time()
            if not (m and B > 1 and not self.args.stage7_batch and left > 30):
                break
            oom.append(B)  # -B too large for this GPU: stage 7's own line; half of it then
            B, why = B // 2, f"-B {', '.join(map(str, oom))} ran out of memory"
        log = self.tmp / f"log_B{B}" / "log.txt"
        if log.is_file():
            shutil.copyfile(log, self.out / "stage7_log.txt")
        return self.stage7_outcome(cmd, r, rows, used, B, T, steps, why)

    def stage7_run(self, B, T, steps, shards, empty, why, raw):
        total = TOKENS_PER_STEP if self.full else 2 * B * T  # CPU: 2 micro-steps (accumulation)
        on = self.device == "cuda" or self.args.compile_on_cpu
        cmd = [sys.executable, ROOT / "7_train_ddp_fineweb.py", "--device", self.device, "-B", B,
               "-T", T, *([] if self.full else TINY), "--steps", steps, "--total-batch-size", total,
               "--compile" if on else "--no-compile", "--data-dir", shards, "--log-dir",
               self.tmp / f"log_B{B}", "--eval-every", 100000, "--val-tokens", 1,
               "--hellaswag-file", empty, "--checkpoint-every", 100000]
        cmd += ["--peak-tflops", self.args.peak_tflops] if self.args.peak_tflops else []
        used = []
        smi = shutil.which("nvidia-smi") if self.device == "cuda" else None
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]

        def poll():  # the GPU memory the run holds, as nvidia-smi sees it (context included)
            try:
                q = subprocess.run([smi, "-i", index if index.isdigit() else "0",
                                    "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=5)
                used.append(float(q.stdout.split()[0]))
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
                pass

        self.say(f"stage7: -B {B} ({why}): {show(cmd, self.tmp)}")
        r = self.run(cmd, raw, self.deadline - time.time(), poll if smi else None)
        return cmd, r, parse_steps(r.text), used

    def stage7_outcome(self, cmd, r, rows, used, B, T, steps, why):
        config = SimpleNamespace(n_layer=12 if self.full else 2, n_embd=768 if self.full else 32,
                                 vocab_size=50304)
        tok = median_after(rows, "tok/s")
        peak = self.info.get("peak_tflops")
        mfu = tok * flops_per_token(config, T) / (peak * 1e12) * 100 if tok and peak else None
        printed_mfu = median_after(rows, "mfu")
        t_first = next((t for t, line in r.lines if STEP_LINE.match(line.strip())), None)
        t_val = next((t for t, line in r.lines if line.startswith("validation loss")), None)
        n_skip = 3 if len(rows) > 3 else 0
        body = [f"- `{show(cmd, self.tmp)}`", f"- -B {B}: {why}; {status(r)} after {r.seconds:.0f} "
                f"s; {len(rows)} of {steps} step lines (raw: stage7.txt, its log: stage7_log.txt)"]
        figures = []
        if tok:
            body.append(f"- tok/s, median of steps {n_skip}-{rows[-1]['step']:.0f}: "
                        f"**{tok:,.0f}**; "
                        "MFU " + (f"**{mfu:.1f}%** (6N + 12LCT FLOPs per token against {peak:g} "
                                  "TFLOP/s)" if mfu else "unknown (no peak: pass --peak-tflops)")
                        + (f"; the step lines' own mfu median: {printed_mfu:.1f}%"
                           if printed_mfu else ""))
            timeline = [f"ms/step median: {median_after(rows, 'dt'):.0f}",
                        f"step 0 (with compile on, it compiles the training step): "
                        f"{rows[0]['dt'] / 1000:.1f} s"]
            if t_val:  # before step 0: imports, shard checks, the model, the val loss (own graph)
                timeline.append(f"from the start to step 0's val loss: {t_val:.0f} s")
            if t_first:
                timeline.append(f"to step 0's line: {t_first:.0f} s")
            body.append("- " + "; ".join(timeline))
            figures += [("stage 7 -B", B), ("stage 7 tok/s (median)", f"{tok:,.0f}"),
                        ("stage 7 MFU %", f"{mfu:.1f}" if mfu else "-"),
                        ("stage 7 ms/step (median)", f"{median_after(rows, 'dt'):.0f}"),
                        ("stage 7 step 0 s (compile)", f"{rows[0]['dt'] / 1000:.1f}")]
        if used:
            body.append("- GPU memory in use during the run (nvidia-smi, most seen): "
                        f"{max(used) / 1024:.1f} GiB")
            figures.append(("stage 7 GPU memory in use GiB (nvidia-smi)",
                            f"{max(used) / 1024:.1f}"))
        hours, hour_figures = self.hours_section(tok, B)
        if len(rows) >= steps and (r.rc == 0 or r.rc is None):
            state, note = "ok", "" if r.rc == 0 else "killed after its last step line, while saving"
        elif r.rc is None:
            state, note = "cut", f"{status(r)} after {len(rows)} of {steps} steps"
        else:
            err = [line for _, line in r.lines if line.startswith("error")]
            state, note = "failed", f"{status(r)}" + (f": {err[-1][:120]}" if err else "")
        if note:
            body.append(f"- **{state}**: {note}")
        return outcome("\n".join(body) + "\n\n" + hours, figures + hour_figures, state, note)

    def hours_section(self, tok, B):
        lines = ["### The full run", ""]
        if not tok:
            return "\n".join(lines + ["no tok/s: stage 7 gave no step lines"]), []
        h1, h8 = run_hours(tok), run_hours(tok, 8)
        note = "" if self.full else " **CPU rehearsal: the tiny model's speed, not GPT-2 124M's.**"
        tokens = FULL_RUN_STEPS * TOKENS_PER_STEP
        lines += [f"{FULL_RUN_STEPS:,} steps x {TOKENS_PER_STEP:,} tokens = {tokens / 1e9:.2f}B "
                  f"tokens at stage 7's {tok:,.0f} tok/s (-B {B}):{note}", "",
                  f"- on this {self.info.get('gpu') or self.device.upper()}: **{h1:,.1f} h**",
                  f"- on 8 of them: **{h8:,.2f} h**, assuming DDP scales linearly (an assumption, "
                  "not measured here; the lecture measured ~1.5M tok/s on 8 A100s, "
                  f"{run_hours(1.5e6):.2f} h)"]
        figures = [("full run hours, this device", f"{h1:.1f}"),
                   ("full run hours, 8 of them (linear)", f"{h8:.2f}")]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ speed

    def speed_batch(self):
        """bench_speedup keeps 7 variants of 124M resident (~1.5 GB each: weights + AdamW state)
        and needs ~2.2 GB per sequence at T=1024 for the fp32 eager row: the lecture's 16 where
        that fits (an estimate)."""
        if self.device != "cuda":
            return 4
        b = 16
        while b >= 1 and 10.5 + 2.2 * b > 0.9 * self.gib * GIB / 1e9:
            b //= 2
        return b

    def speed(self, raw):
        script = HERE / "bench_speedup.py"
        cap = self.deadline - time.time()
        if self.full:
            B = self.speed_batch()
            if B < 1:
                return outcome(f"skipped: the 7 side-by-side variants need more than this GPU's "
                               f"{self.gib:.1f} GiB; run bench_speedup.py -B 1 --skip-compile "
                               "yourself", [], "skipped", "too little GPU memory")
            cmd = [sys.executable, script, "--device", self.device, "-B", B, "-T", T_FULL,
                   "--warmup", 2]
            cmd += ["--skip-compile"] if self.device == "mps" else []
            reserve = 25  # the interleaved rounds and the table after the last warm-up
        else:
            cmd = [sys.executable, script, "--device", "cpu", "-B", 1, "-T", 32, *TINY,
                   "--warmup", 1, "--rounds", 1]
            cmd += [] if self.args.compile_on_cpu else ["--skip-compile"]
            reserve = 10
        # a warm-up that would end past it is not started (bench_speedup predicts a compilation
        # from the one before it): the table of the rows warmed up still comes out
        cmd += ["--deadline-s", f"{max(1, cap - reserve):.0f}"]
        cmd += ["--peak-tflops", self.args.peak_tflops] if self.args.peak_tflops else []
        self.say(f"speed: {show(cmd, self.tmp)}")
        r = self.run(cmd, raw, cap)
        lines = r.text.splitlines()
        start = next((k for k, line in enumerate(lines) if line.startswith("| variant")), None)
        table = [line for line in lines[start or len(lines):] if line.startswith("|")]
        late = [line for line in lines if line.startswith("past --deadline-s")]
        extra = [line for line in lines if line.startswith("peak GPU memory")] + late
        warm = [line for line in lines if line.startswith("warm-up ")]
        title = next((line for line in lines if re.match(r"^(124M|n_layer)", line)), "")
        body = [f"`{show(cmd, self.tmp)}` ({status(r)}, {r.seconds:.0f} s)", "", title, "",
                *(table or ["no table (see speed.txt); the warm-ups measured:", "",
                            *[f"- {w}" for w in warm]]), "", *[f"- {e}" for e in extra]]
        figures = []
        header = [c.strip() for c in table[0].strip("|").split("|")] if table else []
        for line in table[2:]:
            cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            name = cells.get("variant", "?")
            figures.append((f"speed: {name}",
                            ", ".join(f"{k} {v}" for k, v in cells.items() if k != "variant")))
        n = len(table[2:])
        if r.rc is None or late:
            state, note = "cut", (f"{status(r)}; " if r.rc is None else "") + \
                f"{n} rows timed" + (f", not timed: {late[0].split(': not timed: ')[-1]}"
                                     if late else "")
        elif r.rc != 0 or not table:
            state, note = "failed", f"{status(r)}, no table" if not table else status(r)
        else:
            state, note = "ok", ""
        return outcome("\n".join(body), figures, state, note)

    # ------------------------------------------------------------------ memory

    def memory(self, raw):
        script = HERE / "bench_memory.py"
        cap = self.deadline - time.time()
        if self.full:  # B=1 left out: every GPU of CARDS_GB holds B=2, and compiled it would
            cmd = [sys.executable, script, "--device", self.device, "-T", T_FULL,  # compile again
                   "--min-batch", 2]
            reserve = 45  # a B started before the deadline: a compilation's time
        else:
            cmd = [sys.executable, script, "--device", "cpu", "-T", "16", "--max-batch", "2", *TINY,
                   "--modes", "eager,compile" if self.args.compile_on_cpu else "eager"]
            reserve = 5
        cmd += ["--deadline-s", f"{max(1, cap - reserve):.0f}"]
        self.say(f"memory: {show(cmd, self.tmp)}")
        r = self.run(cmd, raw, cap)
        rows, stops, context = parse_memory(r.text)
        unit = "GiB (GPU: peak allocated / peak reserved)" if self.device == "cuda" else \
            "GiB (CPU: peak RSS above the start / peak RSS)" if self.device == "cpu" else \
            "GiB (mps: most seen)"
        bs = sorted(set(rows["eager"]) | set(rows["compile"]))

        def cell(mode, b):
            return f"{rows[mode][b][0]:.2f} / {rows[mode][b][1]:.2f}" if b in rows[mode] else "-"
        table = ["| -B | eager | compiled |", "| ---: | ---: | ---: |"] + \
                [f"| {b} | {cell('eager', b)} | {cell('compile', b)} |" for b in bs]
        body = [f"`{show(cmd, self.tmp)}` ({status(r)}, {r.seconds:.0f} s). Memory in {unit}, "
                f"T={T_FULL if self.full else 16}, two optimisation steps of two micro-steps each "
                "(AdamW's state counted):", "", *table, ""]
        body += [f"- {s}" for s in stops] or ["- the sweep reached --max-batch"]
        if context is not None:
            body.append(f"- in use outside PyTorch's allocator (CUDA context, libraries): "
                        f"{context:.2f} GiB")
        figures = [(f"memory -B {b} {mode} reserved GiB", f"{rows[mode][b][1]:.2f}")
                   for mode in ("eager", "compile") for b in sorted(rows[mode])]
        cards, card_figures = self.cards_section(rows, context)
        late = [s for s in stops if "past --deadline-s" in s]
        errors = [s for s in stops if s.startswith("error")]
        if r.rc is None or late:
            state, note = "cut", "; ".join(([status(r)] if r.rc is None else []) + late)
        elif r.rc != 0 or not bs or errors:
            state, note = "failed", "; ".join([status(r)] + errors[:1]) if bs else \
                f"{status(r)}, no rows"
        else:
            state, note = "ok", ""
        return outcome("\n".join(body) + "\n\n" + cards, figures + card_figures, state, note)

    def cards_section(self, rows, context):
        """The -B table of docs/hardware.md, measured: the largest -B per GPU size."""
        ctx = max(CONTEXT_GIB, context or 0) if self.device == "cuda" else 0.0
        head = "| GPU memory | " + " | ".join(f"{g} GB" for g in CARDS_GB) + " |"
        what = (f"{ctx:.2f} GiB (the CUDA context: the larger of {CONTEXT_GIB} GiB and what was "
                "measured here)" if self.device == "cuda" else "nothing (no CUDA context here)")
        lines = ["### Largest -B by GPU memory", "",
                 f"A -B fits a GPU sold as N GB when its peak reserved memory + {what} <= "
                 f"{USABLE} x N GiB (what CUDA sees of such a card; a desktop on the same GPU "
                 "takes more). Powers of two only, so that -B divides 524,288 / 1024; '>= B': "
                 "every measured -B fit, a larger one may too."
                 + ("" if self.device == "cuda" else " **Not a GPU here: these are the tiny "
                    "model's RAM figures; they only exercise the code.**"),
                 "", head, "| --- |" + " ---: |" * len(CARDS_GB)]
        figures = []
        for mode, label in (("compile", "compiled (default on CUDA)"),
                            ("eager", "eager (--no-compile)")):
            if rows[mode]:
                reserved = {b: v[1] for b, v in rows[mode].items()}
                best = [fmt_b(largest_batch(reserved, g, ctx)) for g in CARDS_GB]
                lines.append(f"| largest -B, {label} | " + " | ".join(best) + " |")
                figures += [(f"largest -B {mode}, {g} GB", b) for g, b in zip(CARDS_GB, best)]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ pytest

    def pytest(self, raw):
        i = self.info
        base = [sys.executable, "-m", "pytest", GPU_TESTS, "-m", "gpu", "-p", "no:cacheprovider",
                "-v", "-rfEs"]
        cap = self.deadline - time.time()
        n = 0
        if self.device == "cuda" and i.get("xdist"):  # each worker: a CUDA context, a tiny model
            n = min(6, max(1, (i.get("cpus") or 2) // 2), max(1, int(self.gib // 4)))
        if self.device == "cuda":  # (label, command, seconds kept for the runs after it)
            runs = [("parallel" if n >= 2 else "all but the out-of-memory test",
                     base + ["-k", f"not {OOM_TEST}"] + (["-n", str(n)] if n >= 2 else []),
                     min(30, cap / 4)),
                    ("out-of-memory test alone", base + ["-k", OOM_TEST], 0)]
        else:  # the rehearsal: every test skips without CUDA; one run shows the code path
            runs = [("every gpu test (no CUDA: all skip)", base, 0)]
        lines, figures, states = [], [], []
        for label, cmd, kept in runs:
            limit = self.deadline - time.time() - kept
            if i.get("pytest_timeout"):  # per test, within the run's limit: a hung test fails
                cmd = cmd + ["--timeout", f"{max(5, limit - 5):.0f}"]  # alone, the summary comes
            self.say(f"pytest: {label}: {show(cmd, self.tmp)}")
            r = self.run(cmd, raw, limit)
            summary, counts, failed = parse_pytest(r.text)
            done = parse_progress(r.text)
            if r.rc is None:  # stopped before its summary: what the -v lines say so far
                seen = {o: sum(1 for v in done.values() if v == o) for o in set(done.values())}
                summary = f"{status(r)}; so far: " + (", ".join(f"{k} {v.lower()}" for v, k in
                                                                 sorted(seen.items())) or "none")
                failed = failed or [t for t, o in done.items() if o in ("FAILED", "ERROR")]
                states.append("cut")
            elif r.rc not in (0, 5) or counts.get("failed") or counts.get("error"):
                states.append("failed")  # 5: nothing collected
            lines.append(f"- {label}: `{show(cmd, self.tmp)}`: {summary or 'no summary'} "
                         f"({status(r)}, {r.seconds:.0f} s)")
            if failed:
                lines.append("  - failed: " + ", ".join(f"`{f}`" for f in failed))
            figures.append((f"pytest -m gpu, {label}", (summary or status(r)).replace("|", "/")))
        state = "cut" if "cut" in states else "failed" if states else "ok"
        note = "; ".join(f[1] for f in figures) if state != "ok" else ""
        return outcome("\n".join(lines), figures, state, note)

    # ------------------------------------------------------------------ main loop

    def on_signal(self, signum, frame):
        """The first Ctrl-C (or SIGTERM) stops the part running and writes the report; a second
        one stops at once (still with one line)."""
        if self.stop_signal:
            raise KeyboardInterrupt
        # no print here: the signal may come in the middle of one (a reentrant write fails)
        self.stop_signal = SIGNAL_NAMES.get(signum, f"signal {signum}")

    def main(self):
        handlers = {s: signal.signal(s, self.on_signal) for s in SIGNAL_NAMES}
        code = 1
        try:
            code = self.check()
        except KeyboardInterrupt:  # a second Ctrl-C
            self.stop_signal = self.stop_signal or "Ctrl-C"
            code = self.end()
        except OSError as e:  # the report's folder became unwritable (disk full, removed), say
            where = f" ({e.filename})" if e.filename else ""
            print(f"error: {e.strerror or e}{where}; the report so far follows on stdout",
                  file=sys.stderr)
            if self.report:
                print(self.report.text())
            code = 1
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            shutil.rmtree(self.tmp, ignore_errors=True)
        return code

    def start_report(self, versions):
        slug = re.sub(r"[^a-z0-9]+", "-", (self.info.get("gpu") or self.device).lower()).strip("-")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = self.out or out_folder(HERE / "results" / f"gpu_check_{slug}_{stamp}", "folder")
        shutil.move(str(versions), self.out / "versions.txt")
        mode = f"{self.device}, full sizes (GPT-2 124M, T=1024)" if self.full else (
            "CPU rehearsal: a tiny model (n_layer 2, n_head 2, n_embd 32) and small B and T; the "
            "figures exercise the code, they are not GPT-2 124M's")
        name = self.info.get("gpu") or self.device.upper() + ("" if self.full else " (rehearsal)")
        command = shlex.join(["python", os.path.relpath(__file__, ROOT)] + self.argv)
        now = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
        meta = (f"`{command}` | {now} | mode: {mode} | budget {self.args.budget_s:.0f} s")
        self.report = Report(self.out / "report.md", f"GPU check on {name}", meta, self.headline)

    def check(self):
        args = self.args
        if args.out:
            self.out = out_folder(args.out)
        self.say("versions: probing python, torch, the GPU")
        self.running = "versions"
        versions = self.versions()
        if self.stop_signal and not self.info:
            print(f"gpu_check: stopped by {self.stop_signal} during the versions probe; nothing "
                  "was measured", file=sys.stderr)
            return 128 + (15 if self.stop_signal == "SIGTERM" else 2)
        self.start_report(versions)
        self.states["versions"] = ("ok", "") if self.info else ("failed", "the probe: versions.txt")
        body, figures = self.versions_section()
        self.report.add(f"versions ({self.versions_run.seconds:.0f} s; raw: versions.txt)", body,
                        figures)
        self.say(f"versions: {self.info.get('gpu') or self.device}, torch "
                 f"{self.info.get('torch')}; writing to {self.out}")
        bpe_ok = self.info.get("bpe", bpe_present(bpe_dir(self.env)))  # the probe's, else the files
        if not bpe_ok:
            print(BPE_ERROR, file=sys.stderr, flush=True)
            self.report.add("GPT-2's BPE files", BPE_ERROR)
            self.states["bpe"] = ("missing", "see above")
        self.schedule(bpe_ok)
        return self.end()

    def schedule(self, bpe_ok):
        """Each requested part in PARTS order, under its cap: its share of the time left now plus
        what the parts before it left unused (so the caps add up to the budget)."""
        start = time.time()
        left = self.args.budget_s - (start - self.t0)
        parts = [p for p in PARTS if p in self.args.parts]
        total = sum(SHARES[p] for p in parts)
        share_end = 0.0
        for part in parts:
            if self.stop_signal:
                break
            share_end += SHARES[part] / total
            cap = start + left * share_end - time.time()
            self.caps[part] = cap
            title = TITLES[part]
            if cap < MIN_PART_S["gpu" if self.full else "cpu"]:
                line = f"skipped: {max(0, cap):.0f} s of --budget-s {self.args.budget_s:.0f} left"
                self.say(f"{part}: {line}")
                self.states[part] = ("skipped", f"{max(0, cap):.0f} s left")
                self.report.add(title, line, [(part, "skipped (budget)")])
                continue
            if part == "stage7" and not bpe_ok:
                self.states[part] = ("skipped", "GPT-2's BPE files missing")
                self.report.add(title, f"skipped: {BPE_ERROR}", [("stage7", "skipped (BPE files)")])
                continue
            self.deadline, self.running, t = time.time() + cap, part, time.time()
            self.say(f"{part}: up to {cap:.0f} s")
            with open(self.out / RAW_FILES[part], "w") as raw:
                result = getattr(self, part)(raw)
            seconds = time.time() - t
            self.deadline = None
            self.states[part] = (result.state, result.note)
            figures = result.figures + [(f"{part} seconds", f"{seconds:.0f} of {cap:.0f}")]
            self.report.add(f"{title} ({seconds:.0f} s of {cap:.0f}; raw: {RAW_FILES[part]})",
                            result.body, figures)
            self.say(f"{part}: {result.state}" + (f" ({result.note})" if result.note else "")
                     + f" in {seconds:.0f} s")
            if self.stop_signal:
                self.say(f"{self.stop_signal}: writing the report of what was measured (Ctrl-C "
                         "again stops at once)")
            if not self.stop_signal:
                self.running = None

    def end(self):
        """The report's last write: its first line says what is complete and what is not."""
        self.finished = True
        total = time.time() - self.t0
        if self.report is None:
            print(f"gpu_check: stopped by {self.stop_signal}; nothing was measured",
                  file=sys.stderr)
            return 130
        self.report.figures.append(("total seconds", f"{total:.0f}"))
        self.report.write(f"\nTotal {total:.0f} s of --budget-s {self.args.budget_s:.0f}.\n")
        print("\n| figure | value |\n| --- | --- |\n"
              + "".join(f"| {k} | {v} |\n" for k, v in self.report.figures))
        headline = self.headline()
        self.say(f"report: {self.out / 'report.md'}: {headline}")
        if self.stop_signal:
            print(f"gpu_check: stopped by {self.stop_signal} during {self.running or 'the check'}; "
                  f"what was measured is in {self.out / 'report.md'}", file=sys.stderr)
            return 128 + (15 if self.stop_signal == "SIGTERM" else 2)
        requested = [p for p in PARTS if p in self.args.parts]
        clean = all(s == "ok" for s, _ in self.states.values())
        return 0 if clean and all(p in self.states for p in requested) else 1


# ---------------------------------------------------------------------------- flags


def number(kind, lo, above=False):
    """An argparse type: a finite `kind` of at least lo (above lo, if `above`); anything else
    stops the check at once with one line naming the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > lo if above else value >= lo)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"got {text}; pass {what} "
                                             f"{'above' if above else 'of at least'} {lo}")
        return value
    return parse


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("--out", default=None, help="folder for report.md and the raw files; a new "
                        "one (default: benchmarks/results/gpu_check_<device>_<date>/)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"a subset of {','.join(PARTS)}, measured in that order (the probe "
                        "of versions always runs)")
    parser.add_argument("--budget-s", type=number(float, 0), default=BUDGET_S,
                        help="seconds for the whole check; each part gets its share (default: "
                        "%(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                        help="auto: CUDA if there is a GPU, else the CPU rehearsal")
    parser.add_argument("--peak-tflops", type=number(float, 0, above=True), default=None,
                        help="this GPU's dense bf16 TFLOP/s, for MFU")
    parser.add_argument("--steps", type=number(int, 1), default=None,
                        help=f"stage 7's steps (default: {STEPS['gpu']}; {STEPS['cpu']} in the "
                        "CPU rehearsal)")
    parser.add_argument("--stage7-batch", type=number(int, 1), default=None,
                        help="stage 7's -B, a power of two up to 512 (default: 64 where it fits)")
    parser.add_argument("--compile-on-cpu", action="store_true",
                        help="CPU rehearsal: the compiled variants too")
    parser.add_argument("--prepare", action="store_true",
                        help="copy GPT-2's BPE files into .tiktoken_cache/ and exit")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {','.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    if args.stage7_batch and 512 % args.stage7_batch:
        parser.error(f"argument --stage7-batch: got {args.stage7_batch}; pass a power of two up to "
                     "512 (it must divide 524,288 / 1024)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return probe(args.peak_tflops)
    if args.prepare:
        prepare()
        return 0
    if not args.out:  # the default folder's parent, checked before any work
        out_folder(HERE / "results", "benchmarks/results/")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return Check(args, argv).main()


if __name__ == "__main__":
    sys.exit(main())
