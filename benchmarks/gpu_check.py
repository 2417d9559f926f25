"""The GPU check: one command that measures what this repository claims about a GPU.

On one NVIDIA GPU, offline and without `datasets`, in under 9 minutes on an H100/H200, it runs
(each part in its own subprocess, with its own timeout, under one time budget):
  versions  python, torch, CUDA, driver, the GPU's name and memory, its peak for MFU
  pytest    `python -m pytest -m gpu` (in parallel where pytest-xdist is there; the out-of-memory
            test alone, afterwards, since it fills the GPU)
  memory    peak memory of stages 5-7's training step by -B, eager and compiled (bench_memory.py)
  stage7    7_train_ddp_fineweb.py at the full-run setting (B=64, T=1024, 124M, compile on) for 20
            steps on shards it makes (make_bench_shards.py): tok/s and MFU
  speed     the lecture's table, bench_speedup.py -B 16 -T 1024: fp32 -> TF32 -> bf16 -> compile ->
            flash -> 50304 -> fused AdamW, with ms/step, tok/s, MFU and compile seconds
and from those the largest -B for 8-80 GB GPUs and the hours of the full run (19,073 steps of
524,288 tokens) on this GPU and on 8 of them. Raw output per part and DIR/report.md (every figure
in a table at its end) are written as each part finishes.

    python benchmarks/gpu_check.py                     # -> benchmarks/results/gpu_check_<gpu>_<date>/
    python benchmarks/gpu_check.py --out DIR --parts memory,stage7 --budget-s 300
    python benchmarks/gpu_check.py --prepare           # GPT-2's BPE files -> .tiktoken_cache/ (offline boxes)

Without CUDA it rehearses the same sequence on the CPU with a tiny model (2 layers, 32 dims,
small B and T) in about a minute: every code path runs, the figures are not GPT-2 124M's.
"""
import argparse
import datetime
import json
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

PARTS = ("versions", "pytest", "memory", "stage7", "speed")  # order: what a GPU owner needs most comes first
# seconds a part may take on a GPU (an H200 is expected to need half to two thirds of each), under --budget-s
CAPS = {"pytest": 200, "memory": 170, "stage7": 200, "speed": 240}
CPU_CAP, MIN_PART_S = 150, 30
FULL_RUN_STEPS, TOKENS_PER_STEP, T_FULL = 19073, 524288, 1024  # the lecture's 10B-token run
CARDS_GB = (8, 12, 16, 24, 40, 80)
CONTEXT_GIB = 0.5  # the CUDA context and libraries' workspaces, outside PyTorch's caching allocator
USABLE = 0.94  # a GPU sold as N GB gives CUDA ~0.94-1.0 x N GiB (16 GB T4: 15.0 GiB; 24 GB 4090: 23.6 GiB)
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
OOM_TEST = "test_out_of_memory_line_on_cuda"
GIB = 2**30
# tiktoken caches each download under the sha1 of its URL: gpt-2/encodings/main/vocab.bpe, encoder.json
BPE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
BPE_CACHE = ROOT / ".tiktoken_cache"
BPE_ERROR = ("error: GPT-2's BPE files not found: set TIKTOKEN_CACHE_DIR, or copy them into .tiktoken_cache/ "
             "(`python benchmarks/gpu_check.py --prepare` where they are; see docs/hardware.md)")
RAW_FILES = ("report.md", "versions.txt", "pytest.txt", "memory.txt", "stage7.txt", "stage7_log.txt", "speed.txt")
STEP_LINE = re.compile(r"^step\s+(\d+) \| (.*)$")
MEM_ROW = re.compile(r"^\| (eager|compile) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$")
MEM_STOP = re.compile(r"^(stop|OOM|error) (eager|compile): (.*)$")


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
    """Hours of the full run at tok_per_s per GPU, on `gpus` GPUs scaling linearly (an assumption)."""
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
    """bench_memory.py's output: ({mode: {B: (allocated GiB, reserved GiB, first step s)}}, stop lines, context GiB)."""
    rows, stops, context = {"eager": {}, "compile": {}}, [], None
    for line in text.splitlines():
        if m := MEM_ROW.match(line.strip()):
            rows[m.group(1)][int(m.group(2))] = (float(m.group(3)), float(m.group(4)), float(m.group(5)))
        elif MEM_STOP.match(line.strip()):
            stops.append(line.strip())
        elif m := re.match(r"^context: ([\d.]+) GiB", line.strip()):
            context = float(m.group(1))
    return rows, stops, context


def parse_pytest(text):
    """(the summary line, its counts, the FAILED/ERROR test ids) of a pytest run's output."""
    summary, counts = "", {}
    for line in text.splitlines():
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b", line)
        if found and re.search(r" in [\d.]+s", line):
            summary = line.strip(" =")
            counts = {"error" if k.startswith("error") else k: int(n) for n, k in found}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    return summary, counts, failed


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
            except Exception as e:  # noqa: BLE001 - offline: requests' ConnectionError, among others
                sys.exit(f"{BPE_ERROR} [looked in {source}; downloading failed: {type(e).__name__}]")
    source, dest = Path(source), Path(dest)
    if not bpe_present(source):
        sys.exit(f"{BPE_ERROR} [looked in {source}]")
    dest.mkdir(parents=True, exist_ok=True)
    for name in BPE_FILES:
        shutil.copyfile(source / name, dest / name)  # no mode: a read-only source gives a writable copy
    size = sum((dest / n).stat().st_size for n in BPE_FILES)
    print(f"copied GPT-2's BPE files ({size / 1e6:.1f} MB) from {source} to {dest}; gpu_check.py and the tests "
          "read them there when TIKTOKEN_CACHE_DIR is unset (carry that folder to an offline GPU box)")
    return dest


# ---------------------------------------------------------------------------- the probe (versions part)


def probe(peak_override):
    """Print versions and the device, then one line 'GPU_CHECK_PROBE {json}' for the parent."""
    import importlib.metadata as md
    import importlib.util
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "mps_available": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine()}
    for pkg in ("numpy", "tiktoken", "transformers", "triton", "pytest", "pytest-xdist", "pytest-timeout", "datasets"):
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
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,power.limit,"
                                "clocks.max.sm", "--format=csv"], capture_output=True, text=True, timeout=30)
            print(q.stdout.strip())
            lines = q.stdout.strip().splitlines()
            info["driver"] = lines[1].split(", ")[1] if len(lines) > 1 else None
            print(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired, IndexError) as e:
            print(f"nvidia-smi failed: {type(e).__name__}")
    info["nvidia_smi"] = bool(smi)
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), memory_gib=p.total_memory / GIB,
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    try:  # the stage scripts' table: {GPU-name substring: dense bf16 (fp16) TFLOP/s}
        import importlib
        table = importlib.import_module("5_train_speedup").PEAK_TFLOPS
        name = info.get("gpu") or ""
        info["peak_key"] = next((k for k in table if k in name), None) if name else None
        info["peak_tflops"] = peak_tflops(name, table, peak_override) if name or peak_override else None
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
    """SIGKILL the part's process group (torchrun's and pytest-xdist's workers too), or the process itself."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd, raw, timeout, env, poll=None):
    """Run cmd with stdout and stderr going, line by line as they come, to the open file `raw`.
    Returns rc (None if killed at the timeout), seconds, the output text, and each line's time."""
    raw.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
    raw.flush()
    t0 = time.time()
    # a process group of its own (not a session: whatever ends this one's session ends it too)
    group = {} if not hasattr(os, "killpg") else {"process_group": 0} if sys.version_info >= (3, 11) else \
        {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, **group)
    lines = []

    def pump():
        for line in proc.stdout:
            raw.write(line)
            raw.flush()
            lines.append((time.time() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        while True:
            try:
                proc.wait(timeout=max(0.1, min(2.0, t0 + timeout - time.time())))
                break
            except subprocess.TimeoutExpired:
                if poll:
                    poll()
                if time.time() >= t0 + timeout:
                    timed_out = True
                    kill_tree(proc)
                    proc.wait()
                    break
    except BaseException:  # Ctrl-C or SIGTERM: leave nothing running on the GPU
        kill_tree(proc)
        raise
    reader.join(timeout=10)
    seconds = time.time() - t0
    raw.write(f"# exit {proc.returncode}" + (f" (killed at its {timeout:.0f} s timeout)" if timed_out else "")
              + f" after {seconds:.1f} s\n\n")
    raw.flush()
    return SimpleNamespace(rc=None if timed_out else proc.returncode, seconds=seconds, timeout=timeout,
                           text="\n".join(line for _, line in lines), lines=lines)


def show(cmd, tmp=None):
    """A command as a reader would type it: python, paths from the repository root, $TMP for the scratch folder."""
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
    return f"killed at its {r.timeout:.0f} s timeout" if r.rc is None else f"exit {r.rc}"


class Report:
    """report.md, rewritten whole after every part: a kill leaves everything so far."""

    def __init__(self, path, header):
        self.path, self.header, self.sections, self.figures = Path(path), header, [], []

    def add(self, title, body, figures=()):
        self.sections.append(f"## {title}\n\n{body.strip()}\n")
        self.figures += list(figures)
        self.write()

    def write(self, footer=""):
        text = self.header + "\n" + "\n".join(self.sections)
        if self.figures:
            text += "\n## Figures\n\n| figure | value |\n| --- | --- |\n"
            text += "".join(f"| {name} | {value} |\n" for name, value in self.figures)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text + footer)
        os.replace(tmp, self.path)


class Check:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "TIKTOKEN_CACHE_DIR" not in self.env and bpe_present(BPE_CACHE):
            self.env["TIKTOKEN_CACHE_DIR"] = str(BPE_CACHE)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.tmp / "inductor"))  # cold compiles, every run
        self.memory = None  # {mode: {B: (allocated, reserved, first step s)}} once the memory part ran
        self.failed = []

    def say(self, text):
        print(f"[{time.time() - self.t0:5.0f} s] {text}", flush=True)

    def left(self):
        return self.args.budget_s - (time.time() - self.t0)

    # ------------------------------------------------------------------ versions

    def versions(self):
        path = self.tmp / "versions.txt"
        with open(path, "w") as raw:
            cmd = [sys.executable, __file__, "--probe"] + (["--peak-tflops", self.args.peak_tflops]
                                                          if self.args.peak_tflops else [])
            r = run(cmd, raw, 120, self.env)
        m = re.search(r"^GPU_CHECK_PROBE (.*)$", r.text, re.M)
        self.info = json.loads(m.group(1)) if m else {}
        self.versions_run = r
        want = self.args.device
        cuda, mps = self.info.get("cuda_available"), self.info.get("mps_available")
        if want == "cuda" and not cuda:
            sys.exit("error: --device cuda: torch sees no CUDA GPU here (see versions: " + str(path) + ")")
        self.device = "cuda" if want in ("auto", "cuda") and cuda else "mps" if want == "mps" and mps else "cpu"
        if want == "mps" and not mps:
            sys.exit("error: --device mps: torch sees no Apple GPU here")
        self.full = self.device != "cpu"  # full sizes on a GPU; a tiny model in the CPU rehearsal
        if not self.full:  # one thread per process: a tiny model gains nothing from more, and a busy machine
            self.env.setdefault("OMP_NUM_THREADS", "1")  # then slows oversubscribed threads down ~10x
        self.gib = self.info.get("memory_gib") if self.device == "cuda" else None
        return path

    def versions_section(self):
        i, r = self.info, self.versions_run
        if not i:
            return f"the probe failed ({status(r)}): see versions.txt", []
        lines = [f"- python {i['python']} | torch {i['torch']} | CUDA {i.get('cuda')} | cuDNN {i.get('cudnn')} | "
                 f"triton {i.get('triton')} | driver {i.get('driver')} | numpy {i.get('numpy')} | "
                 f"tiktoken {i.get('tiktoken')} | transformers {i.get('transformers')} | datasets {i.get('datasets')}"]
        if self.device == "cuda":
            lines.append(f"- GPU: {i['gpu']} ({i['gpu_count']} visible), {i['memory_gib']:.1f} GiB, compute capability "
                         f"{i['capability']}, {i['sms']} SMs, native bf16: {'yes' if i['bf16_native'] else 'no'}")
        else:
            lines.append(f"- device: {self.device} ({i['machine']}, {i['cpus']} CPUs); no CUDA GPU: "
                         + ("full sizes on mps" if self.full else "CPU rehearsal with a tiny model"))
        peak = i.get("peak_tflops")
        src = "--peak-tflops" if self.args.peak_tflops else f"the stage scripts' PEAK_TFLOPS['{i.get('peak_key')}']"
        lines.append(f"- peak for MFU: {peak:g} TFLOP/s ({src})" if peak else
                     "- peak for MFU: unknown (this device is not in PEAK_TFLOPS; pass --peak-tflops)")
        if i.get("peak_error"):
            lines[-1] += f"; the lookup failed: {i['peak_error']}"
        lines.append(f"- pytest {i.get('pytest')} | pytest-xdist {i.get('pytest-xdist')} | pytest-timeout "
                     f"{i.get('pytest-timeout')} | GPT-2's BPE files: "
                     + ("found" if i.get("bpe") else "MISSING") + f" ({i.get('bpe_dir')})")
        figures = [("python", i["python"]), ("torch", i["torch"]), ("CUDA", i.get("cuda")),
                   ("driver", i.get("driver")), ("device", i.get("gpu") or self.device.upper()),
                   ("GPU memory GiB", f"{i['memory_gib']:.1f}" if self.device == "cuda" else "-"),
                   ("peak TFLOP/s for MFU", f"{peak:g}" if peak else "-")]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ pytest

    def pytest(self, raw, budget):
        i = self.info
        base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs"]
        n = 0
        if self.device == "cuda" and i.get("xdist"):  # parallel on a GPU: each worker holds a context and a tiny model
            n = min(6, max(1, (i.get("cpus") or 2) // 2), max(1, int(self.gib // 4)))
        # per test: under the parallel run's share, so that a hung test fails alone (few CPUs compile slowly)
        timeout = ["--timeout", "120" if (i.get("cpus") or 2) >= 8 else "300"] if i.get("pytest_timeout") else []
        alone_s = min(60, budget / 4)
        runs = [("parallel" if n >= 2 else "all but the out-of-memory test",
                 base + ["-k", f"not {OOM_TEST}"] + (["-n", str(n)] if n >= 2 else []) + timeout, budget - alone_s),
                ("out-of-memory test alone", base + ["-k", OOM_TEST] + timeout, alone_s)]
        lines, figures, ok = [], [], True
        for label, cmd, cap in runs:
            self.say(f"pytest: {label}: {show(cmd, self.tmp)}")
            r = run(cmd, raw, max(10, min(cap, self.deadline - time.time())), self.env)
            summary, counts, failed = parse_pytest(r.text)
            ok &= r.rc in (0, 5) and not counts.get("failed") and not counts.get("error")  # 5: nothing collected
            lines.append(f"- {label}: `{show(cmd, self.tmp)}`: {summary or 'no summary'} "
                         f"({status(r)}, {r.seconds:.0f} s)")
            if failed:
                lines.append("  - failed: " + ", ".join(f"`{f}`" for f in failed))
            figures.append((f"pytest -m gpu, {label}", (summary or status(r)).replace("|", "/")))
        return "\n".join(lines), figures, ok

    # ------------------------------------------------------------------ memory

    def memory_part(self, raw, budget):
        script = HERE / "bench_memory.py"
        if self.full:
            cmd = [sys.executable, script, "--device", self.device, "-T", T_FULL]
        else:
            cmd = [sys.executable, script, "--device", "cpu", "-T", "16", "--max-batch", "8", *TINY,
                   "--modes", "eager,compile" if self.args.compile_on_cpu else "eager"]
        cmd += ["--deadline-s", f"{max(5, budget - 45):.0f}"]  # leave a compile's time for the last B
        self.say(f"memory: {show(cmd, self.tmp)}")
        r = run(cmd, raw, budget, self.env)
        rows, stops, context = parse_memory(r.text)
        self.memory, self.context = rows, context
        unit = "GiB (GPU: peak allocated / peak reserved)" if self.device == "cuda" else \
            "GiB (CPU: peak RSS above the start / peak RSS)" if self.device == "cpu" else "GiB (mps: most seen)"
        bs = sorted(set(rows["eager"]) | set(rows["compile"]))
        def cell(mode, b):
            return f"{rows[mode][b][0]:.2f} / {rows[mode][b][1]:.2f}" if b in rows[mode] else "-"
        table = ["| -B | eager | compiled |", "| ---: | ---: | ---: |"] + \
                [f"| {b} | {cell('eager', b)} | {cell('compile', b)} |" for b in bs]
        body = [f"`{show(cmd, self.tmp)}` ({status(r)}, {r.seconds:.0f} s). Memory in {unit}, "
                f"T={T_FULL if self.full else 16}, two optimisation steps of two micro-steps each (AdamW's state "
                "counted):", "", *table, ""]
        body += [f"- {s}" for s in stops] or ["- the sweep reached --max-batch"]
        if context is not None:
            body.append(f"- in use outside PyTorch's allocator (CUDA context, libraries): {context:.2f} GiB")
        figures = [(f"memory -B {b} {mode} reserved GiB", f"{rows[mode][b][1]:.2f}")
                   for mode in ("eager", "compile") for b in sorted(rows[mode])]
        cards, card_figures = self.cards_section()
        return "\n".join(body) + "\n\n" + cards, figures + card_figures, r.rc == 0 and bool(bs)

    def cards_section(self):
        """The -B table of docs/hardware.md, measured: the largest -B per GPU size."""
        rows = self.memory
        ctx = max(CONTEXT_GIB, self.context or 0) if self.device == "cuda" else 0.0
        head = "| GPU memory | " + " | ".join(f"{g} GB" for g in CARDS_GB) + " |"
        context = (f"{ctx:.2f} GiB (the CUDA context: the larger of {CONTEXT_GIB} GiB and what was measured here)"
                   if self.device == "cuda" else "nothing (no CUDA context here)")
        lines = ["### Largest -B by GPU memory", "",
                 f"A -B fits a GPU sold as N GB when its peak reserved memory + {context} <= {USABLE} x N GiB (what "
                 "CUDA sees of such a card; a desktop on the same GPU takes more). Powers of two only, so that -B "
                 "divides 524,288 / 1024; '>= B': every measured -B fit, a larger one may too."
                 + ("" if self.device == "cuda" else " **Not a GPU here: these are the tiny model's RAM figures; "
                                                      "they only exercise the code.**"),
                 "", head, "| --- |" + " ---: |" * len(CARDS_GB)]
        figures = []
        for mode, label in (("compile", "compiled (default on CUDA)"), ("eager", "eager (--no-compile)")):
            if rows[mode]:
                reserved = {b: v[1] for b, v in rows[mode].items()}
                best = [fmt_b(largest_batch(reserved, g, ctx)) for g in CARDS_GB]
                lines.append(f"| largest -B, {label} | " + " | ".join(best) + " |")
                figures += [(f"largest -B {mode}, {g} GB", b) for g, b in zip(CARDS_GB, best)]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ stage 7

    def stage7_batch(self):
        """-B for stage 7 on this GPU: 64 (the lecture's) where it fits, else the largest that does."""
        if self.args.stage7_batch:
            return self.args.stage7_batch, "--stage7-batch"
        if not self.full:
            return 2, "CPU rehearsal"
        if self.device == "cuda" and self.memory and self.memory["compile"]:
            reserved = {b: v[1] for b, v in self.memory["compile"].items() if b <= 64}
            b, _ = largest_batch(reserved, self.gib, max(CONTEXT_GIB, self.context or 0), usable=0.97)
            if b:
                return b, "the largest measured compiled -B <= 64 that fits this GPU"
        if self.gib:  # the estimate in docs/hardware.md: 2.5 GB + 0.85 GB per sequence
            b = 64
            while b > 1 and 2.5 + 0.85 * b > 0.9 * self.gib * GIB / 1e9:
                b //= 2
            return b, "the estimate in docs/hardware.md (no measured memory)"
        return 16, "no memory figure (mps)"

    def stage7(self, raw, budget):
        shards, log_dir = self.tmp / "shards", self.tmp / "log"
        empty = self.tmp / "no_hellaswag.jsonl"
        empty.write_text("")
        make = [sys.executable, HERE / "make_bench_shards.py", "--out-dir", shards]
        if not self.full:
            make += ["--shard-size", "200000", "--val-size", "20000"]
        self.say(f"stage7: {show(make, self.tmp)}")
        r0 = run(make, raw, min(120, budget / 2), self.env)
        B, why = self.stage7_batch()
        T = T_FULL if self.full else 64
        total = TOKENS_PER_STEP if self.full else 2 * B * T  # CPU: 2 micro-steps, the accumulation path
        size = [] if self.full else TINY
        compile_ = ["--compile"] if self.device == "cuda" or self.args.compile_on_cpu else ["--no-compile"]
        cmd = [sys.executable, ROOT / "7_train_ddp_fineweb.py", "--device", self.device, "-B", B, "-T", T, *size,
               "--steps", self.args.steps, "--total-batch-size", total, *compile_, "--data-dir", shards,
               "--log-dir", log_dir, "--eval-every", 100000, "--val-tokens", 1, "--hellaswag-file", empty,
               "--checkpoint-every", 100000]
        cmd += ["--peak-tflops", self.args.peak_tflops] if self.args.peak_tflops else []
        used = []
        smi = shutil.which("nvidia-smi") if self.device == "cuda" else None
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]

        def poll():  # the GPU memory the run holds, as nvidia-smi sees it (context included)
            try:
                q = subprocess.run([smi, "-i", index if index.isdigit() else "0", "--query-gpu=memory.used",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                used.append(float(q.stdout.split()[0]))
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
                pass

        self.say(f"stage7: -B {B} ({why}): {show(cmd, self.tmp)}")
        r = None
        if r0.rc == 0:
            r = run(cmd, raw, max(10, self.deadline - time.time()), self.env, poll if smi else None)
        if (log_dir / "log.txt").is_file():
            shutil.copyfile(log_dir / "log.txt", self.out / "stage7_log.txt")
        if r is None:
            return f"make_bench_shards.py failed ({status(r0)}): see stage7.txt", [], False
        rows = parse_steps(r.text)
        config = SimpleNamespace(n_layer=12 if self.full else 2, n_embd=768 if self.full else 32, vocab_size=50304)
        tok = median_after(rows, "tok/s")
        peak = self.info.get("peak_tflops")
        mfu = tok * flops_per_token(config, T) / (peak * 1e12) * 100 if tok and peak else None
        printed_mfu = median_after(rows, "mfu")
        t_first = next((t for t, line in r.lines if STEP_LINE.match(line.strip())), None)
        t_val = next((t for t, line in r.lines if line.startswith("validation loss")), None)
        n_skip = 3 if len(rows) > 3 else 0
        body = [f"- `{show(cmd, self.tmp)}`", f"- -B {B}: {why}; {status(r)} after {r.seconds:.0f} s; "
                f"{len(rows)} step lines (raw: stage7.txt, its log: stage7_log.txt)"]
        figures = []
        if tok:
            body.append(f"- tok/s, median of steps {n_skip}-{rows[-1]['step']:.0f}: **{tok:,.0f}**; MFU "
                        + (f"**{mfu:.1f}%** (6N + 12LCT FLOPs per token against {peak:g} TFLOP/s)" if mfu else
                           "unknown (no peak: pass --peak-tflops)")
                        + (f"; the step lines' own mfu median: {printed_mfu:.1f}%" if printed_mfu else ""))
            timeline = [f"ms/step median: {median_after(rows, 'dt'):.0f}",
                        f"step 0 (which compiles the training graph, with compile on): {rows[0]['dt'] / 1000:.1f} s"]
            if t_val:  # before step 0: imports, shard checks, the model, and the val loss (its own compiled graph)
                timeline.append(f"from the start to step 0's val loss: {t_val:.0f} s")
            if t_first:
                timeline.append(f"to step 0's line: {t_first:.0f} s")
            body.append("- " + "; ".join(timeline))
            figures += [("stage 7 -B", B), ("stage 7 tok/s (median)", f"{tok:,.0f}"),
                        ("stage 7 MFU %", f"{mfu:.1f}" if mfu else "-"),
                        ("stage 7 ms/step (median)", f"{median_after(rows, 'dt'):.0f}"),
                        ("stage 7 step 0 s (compile)", f"{rows[0]['dt'] / 1000:.1f}")]
        if used:
            body.append(f"- GPU memory in use during the run (nvidia-smi, most seen): {max(used) / 1024:.1f} GiB")
            figures.append(("stage 7 GPU memory in use GiB (nvidia-smi)", f"{max(used) / 1024:.1f}"))
        hours = self.hours_section(tok, B)
        return "\n".join(body) + "\n\n" + hours[0], figures + hours[1], r.rc == 0 and len(rows) > 0

    def hours_section(self, tok, B):
        lines = ["### The full run", ""]
        if not tok:
            return "\n".join(lines + ["no tok/s: stage 7 gave no step lines"]), []
        h1, h8 = run_hours(tok), run_hours(tok, 8)
        note = "" if self.full else " **CPU rehearsal: the tiny model's speed, not GPT-2 124M's.**"
        tokens = FULL_RUN_STEPS * TOKENS_PER_STEP
        lines += [f"{FULL_RUN_STEPS:,} steps x {TOKENS_PER_STEP:,} tokens = {tokens / 1e9:.2f}B tokens at stage 7's "
                  f"{tok:,.0f} tok/s (-B {B}):{note}", "",
                  f"- on this {self.info.get('gpu') or self.device.upper()}: **{h1:,.1f} h**",
                  f"- on 8 of them: **{h8:,.2f} h**, assuming DDP scales linearly (an assumption, not measured here; "
                  f"the lecture measured ~1.5M tok/s on 8 A100s, {run_hours(1.5e6):.2f} h)"]
        figures = [("full run hours, this device", f"{h1:.1f}"), ("full run hours, 8 of them (linear)", f"{h8:.2f}")]
        return "\n".join(lines), figures

    # ------------------------------------------------------------------ speed

    def speed_batch(self):
        """bench_speedup keeps 7 variants of 124M resident (~1.5 GB each: weights + AdamW state) and needs
        ~2.2 GB per sequence at T=1024 for the fp32 eager row: the lecture's 16 where that fits (an estimate)."""
        if self.device != "cuda":
            return 4
        b = 16
        while b >= 1 and 10.5 + 2.2 * b > 0.9 * self.gib * GIB / 1e9:
            b //= 2
        return b

    def speed(self, raw, budget):
        script = HERE / "bench_speedup.py"
        if self.full:
            B = self.speed_batch()
            if B < 1:
                return (f"skipped: the 7 side-by-side variants need more than this GPU's {self.gib:.1f} GiB; "
                        "run bench_speedup.py -B 1 --skip-compile yourself"), [], True
            cmd = [sys.executable, script, "--device", self.device, "-B", B, "-T", T_FULL]
            cmd += ["--skip-compile"] if self.device == "mps" else []
        else:
            cmd = [sys.executable, script, "--device", "cpu", "-B", 2, "-T", 64, *TINY, "--warmup", 1, "--rounds", 3]
            cmd += [] if self.args.compile_on_cpu else ["--skip-compile"]
        cmd += ["--deadline-s", f"{max(5, budget - 60):.0f}"]  # the rounds and the table after the last warm-up
        cmd += ["--peak-tflops", self.args.peak_tflops] if self.args.peak_tflops else []
        self.say(f"speed: {show(cmd, self.tmp)}")
        r = run(cmd, raw, budget, self.env)
        lines = r.text.splitlines()
        start = next((k for k, line in enumerate(lines) if line.startswith("| variant")), None)
        table = [line for line in lines[start:] if line.startswith("|")] if start is not None else []
        extra = [line for line in lines if line.startswith(("peak GPU memory", "past --deadline-s"))]
        title = next((line for line in lines if re.match(r"^(124M|n_layer)", line)), "")
        body = [f"`{show(cmd, self.tmp)}` ({status(r)}, {r.seconds:.0f} s)", "", title, "",
                *(table or ["no table: see speed.txt"]), "", *[f"- {e}" for e in extra]]
        figures = []
        header = [c.strip() for c in table[0].strip("|").split("|")] if table else []
        for line in table[2:]:
            cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            name = cells.get("variant", "?")
            figures.append((f"speed: {name}", ", ".join(f"{k} {v}" for k, v in cells.items() if k != "variant")))
        return "\n".join(body), figures, r.rc == 0 and bool(table)

    # ------------------------------------------------------------------ main loop

    def main(self):
        args = self.args
        try:
            self.say("versions: probing python, torch, the GPU")
            versions = self.versions()
            slug = re.sub(r"[^a-z0-9]+", "-", (self.info.get("gpu") or self.device).lower()).strip("-")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.out = Path(args.out or HERE / "results" / f"gpu_check_{slug}_{stamp}")
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RAW_FILES:  # an earlier check's files in the same folder would pass for this one's
                (self.out / name).unlink(missing_ok=True)
            shutil.move(str(versions), self.out / "versions.txt")
            mode = f"{self.device}, full sizes (GPT-2 124M, T=1024)" if self.full else (
                "CPU rehearsal: a tiny model (n_layer 2, n_head 2, n_embd 32) and small B and T; the figures "
                "exercise the code, they are not GPT-2 124M's")
            name = self.info.get("gpu") or self.device.upper() + ("" if self.full else " (rehearsal)")
            header = (f"# GPU check: {name}\n\n"
                      f"`{shlex.join(['python', os.path.relpath(__file__, ROOT)] + (self.argv or []))}` | "
                      f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | mode: {mode} | "
                      f"budget {args.budget_s:.0f} s\n")
            self.report = Report(self.out / "report.md", header)
            body, figures = self.versions_section()
            self.report.add(f"versions ({self.versions_run.seconds:.0f} s; raw: versions.txt)", body, figures)
            self.say(f"versions: done: {self.info.get('gpu') or self.device}, torch {self.info.get('torch')}; "
                     f"writing to {self.out}")
            bpe_ok = self.info.get("bpe", bpe_present(bpe_dir(self.env)))  # the probe's word, else the files
            if not bpe_ok:
                print(BPE_ERROR, file=sys.stderr, flush=True)
                self.report.add("GPT-2's BPE files", BPE_ERROR)
                self.failed.append("bpe")
            parts = [p for p in PARTS[1:] if p in args.parts]
            raw_names = {"pytest": "pytest.txt", "memory": "memory.txt", "stage7": "stage7.txt", "speed": "speed.txt"}
            titles = {"pytest": "pytest -m gpu", "memory": "Memory by -B", "stage7": "Stage 7 at the full-run setting",
                      "speed": "The lecture's speed table"}
            for part in parts:
                left = self.left()
                title = titles[part]
                if left < (MIN_PART_S if self.full else 5):
                    line = f"skipped: {max(0, left):.0f} s of --budget-s {args.budget_s:.0f} left"
                    self.say(f"{part}: {line}")
                    self.report.add(title, line, [(f"{part}", "skipped (budget)")])
                    self.failed.append(part)
                    continue
                if part == "stage7" and not bpe_ok:
                    self.report.add(title, f"skipped: {BPE_ERROR}", [("stage7", "skipped (BPE files)")])
                    self.failed.append(part)
                    continue
                budget = min(CAPS[part] if self.full else CPU_CAP, left)
                self.deadline = time.time() + budget
                t = time.time()
                with open(self.out / raw_names[part], "w") as raw:
                    body, figures, ok = getattr(self, "memory_part" if part == "memory" else part)(raw, budget)
                seconds = time.time() - t
                figures = figures + [(f"{part} seconds", f"{seconds:.0f}")]
                self.report.add(f"{title} ({seconds:.0f} s; raw: {raw_names[part]})", body, figures)
                self.say(f"{part}: {'done' if ok else 'FAILED (see the report)'} in {seconds:.0f} s")
                if not ok:
                    self.failed.append(part)
            total = time.time() - self.t0
            self.report.figures.append(("total seconds", f"{total:.0f}"))
            self.report.write(f"\nTotal {total:.0f} s" + (f"; not clean: {', '.join(self.failed)}" if self.failed else
                                                         "; every part ran cleanly") + ".\n")
            print("\n| figure | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in self.report.figures))
            self.say(f"report: {self.out / 'report.md'}"
                     + (f" (not clean: {', '.join(self.failed)})" if self.failed else ""))
            return 1 if self.failed else 0
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("--out", default=None, help="folder for report.md and the raw files "
                        "(default: benchmarks/results/gpu_check_<device>_<date>/)")
    parser.add_argument("--parts", default=",".join(PARTS[1:]), help=f"a subset of {','.join(PARTS[1:])} "
                        "(versions always runs)")
    parser.add_argument("--budget-s", type=float, default=530, help="parts that would start later are skipped")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                        help="auto: CUDA if there is a GPU, else the CPU rehearsal")
    parser.add_argument("--peak-tflops", type=float, default=None, help="this GPU's dense bf16 TFLOP/s, for MFU")
    parser.add_argument("--steps", type=int, default=20, help="stage 7's steps")
    parser.add_argument("--stage7-batch", type=int, default=None, help="stage 7's -B (default: 64 where it fits)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="CPU rehearsal: the compiled variants too")
    parser.add_argument("--prepare", action="store_true", help="copy GPT-2's BPE files into .tiktoken_cache/ and exit")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args.peak_tflops)
    if args.prepare:
        prepare()
        return 0
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {','.join(PARTS[1:])}")
    args.parts = args.parts.split(",")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the part running, clean up
    check = Check(args)
    check.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
