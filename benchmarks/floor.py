"""Does the repository work at the oldest versions requirements.txt allows (its lower bounds, the
floor)?

Builds a venv with every requirement at its lower bound (`name>=X` -> `name==X`, wheels only),
checks that `pip install -r requirements.txt` in a venv holding only the floor's torch would install
no other torch, runs the test suite there and prints one line: the versions, the dry run's verdict,
passed / failed. The raw output (versions, the dry run, pytest's report) goes to
benchmarks/results/floor_{date}.txt.

    python benchmarks/floor.py                        # a fresh venv in a temp folder, deleted after
    python benchmarks/floor.py --venv /tmp/floor      # keep (or reuse) the venv there
    python benchmarks/floor.py -- tests/test_model.py # pytest arguments after --

Not run by CI: torch's floor from PyPI is a CUDA build of several GB (it runs on a CPU too); CI
tests the newest versions with its pinned torch (.ci/run). Offline like the suite:
TIKTOKEN_CACHE_DIR is set by tests/conftest.py where the workplace has the BPE files;
HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are set here.
"""
import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELF_TEST = "test_the_committed_floor_run_is_of_these_bounds_and_passed"
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.\-+]*)$")


def floor_pins(path):
    """[(name, lower bound)] from requirements.txt, each line `name>=X` (comments and blank lines
    skipped)."""
    pins = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = REQUIREMENT.match(line)
        if not m:
            sys.exit(f"error: {path.name} line {n}: {line!r} is not `name>=version`; "
                     "the floor needs a lower bound")
        pins.append((m.group(1), m.group(2)))
    return pins


def run(cmd, log, keep=lambda line: True, **kw):
    """Run cmd, its output (the lines `keep` keeps) appended to the log; return all of it; raise on
    failure."""
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    # this workplace's local-index notes
                    if not line.startswith("WARNING: Location"))
    log.write("".join(line + "\n" for line in out.splitlines() if keep(line)))
    log.flush()
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(map(str, cmd[:4]))} ...` exited {proc.returncode}; "
                           f"see {log.name}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="build (or reuse) the venv here and keep it")
    parser.add_argument("--out", type=Path,
                        help="raw output file (default benchmarks/results/floor_{date}.txt)")
    parser.add_argument("pytest_args", nargs="*",
                        help="after --: what to pass to pytest (default: the suite)")
    args = parser.parse_args(argv)
    requirements = ROOT / "requirements.txt"
    pins = floor_pins(requirements)
    torch_pin = next((f"{n}=={v}" for n, v in pins if n.lower() == "torch"), None)
    if torch_pin is None:
        sys.exit(f"error: {requirements.name} names no torch")
    out_path = args.out or ROOT / "benchmarks" / "results" / f"floor_{datetime.date.today()}.txt"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    venv = args.venv or Path(tempfile.mkdtemp(prefix="floor_venv_"))
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    try:
        with open(out_path, "w", encoding="utf-8") as log:
            log.write(f"# python benchmarks/floor.py "
                      f"{' '.join(argv if argv is not None else sys.argv[1:])}\n"
                      f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                      f"Python {sys.version.split()[0]}, {sys.platform}; "
                      "the floor from requirements.txt: "
                      f"{', '.join(f'{n} {v}' for n, v in pins)}\n")
            if not python.exists():
                run([sys.executable, "-m", "venv", venv], log)
            # 1. a venv holding the floor's torch (a fresh one: only it): would
            # `pip install -r requirements.txt` replace it?
            run(pip + ["install", "-q", "--only-binary", ":all:", torch_pin], log)
            dry = run(pip + ["install", "--dry-run", "-r", requirements], log,
                      keep=lambda line: line.startswith(("Would install", "ERROR")))
            would = next((line for line in dry.splitlines()
                          if line.startswith("Would install")), "")
            keeps_torch = not re.search(r"(^|\s)torch-\d", would)
            # 2. every requirement at its lower bound (their own dependencies as pip resolves
            # them), and pytest
            run(pip + ["install", "-q", "--only-binary", ":all:", *[f"{n}=={v}" for n, v in pins],
                       "pytest"], log)
            freeze = run(pip + ["freeze"], log)
            got = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                   for line in freeze.splitlines() if "==" in line}
            wrong = [f"{n} {got.get(n.lower().replace('_', '-'))} (not {v})" for n, v in pins
                     if got.get(n.lower().replace("_", "-"), "").split("+")[0] != v]
            if wrong:
                raise RuntimeError(f"the venv does not hold the floor: {', '.join(wrong)}")
            # 3. the suite
            # (less the test that reads this run's output: it checks the floor run committed
            # before this one)
            cmd = [python, "-m", "pytest", "-p", "no:cacheprovider",
                   "--deselect", f"tests/test_floor.py::{SELF_TEST}", *(args.pytest_args or [])]
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        summary = out_path.read_text(encoding="utf-8").rstrip().splitlines()[-1].strip("= ")
        line = (f"floor ({', '.join(f'{n} {v}' for n, v in pins)}): pytest "
                f"{' '.join(args.pytest_args) + ': ' if args.pytest_args else ''}{summary}; "
                f"`pip install -r requirements.txt` over torch {torch_pin.split('==')[1]} "
                f"{'keeps it' if keeps_torch else 'REPLACES it'}; {time.time() - t0:.0f} s; "
                "raw output: "
                f"{out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")
        print(line)
        with open(out_path, "a", encoding="utf-8") as log:
            log.write(f"\n# {line}\n")
        return 0 if proc.returncode == 0 and keeps_torch else 1
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.venv is None:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
