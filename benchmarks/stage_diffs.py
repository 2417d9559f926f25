"""How big is each stage's diff? Changed lines (added + removed) between adjacent numbered scripts,
module docstrings left out (they describe the stage and differ in every file), as
`git diff --no-index --numstat` counts them, next to the lecture's own commits at the same
boundaries.

    python benchmarks/stage_diffs.py
"""
import ast
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LECTURE = [71, 42, 47, 23, 26, 83, 328, None]  # build-nanogpt's commits at the same boundaries
# (7->8 is beyond the lecture: it has no commit there)


def scripts():
    return sorted(ROOT.glob("[0-9]_*.py"))


def without_docstring(path):
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    body = ast.parse("".join(lines)).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        lines = lines[:body[0].lineno - 1] + lines[body[0].end_lineno:]
    return "".join(lines)


def stage_diffs():
    """[(a, b, changed lines)] for each pair of adjacent numbered scripts."""
    files = scripts()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for a, b in zip(files, files[1:]):
            pa, pb = Path(tmp) / a.name, Path(tmp) / b.name
            pa.write_text(without_docstring(a), encoding="utf-8")
            pb.write_text(without_docstring(b), encoding="utf-8")
            numstat = subprocess.run(["git", "diff", "--no-index", "--numstat", str(pa), str(pb)],
                                     capture_output=True, text=True).stdout.split()
            out.append((a.stem, b.stem, int(numstat[0]) + int(numstat[1]) if numstat else 0))
    return out


def main():
    rows = stage_diffs()
    if not rows:
        sys.exit("error: no numbered scripts found next to benchmarks/")
    print("| stage | changed lines | lecture |")
    print("| --- | ---: | ---: |")
    for (a, b, n), lecture in zip(rows, LECTURE):
        print(f"| {a[0]}->{b[0]} | {n} | {'-' if lecture is None else lecture} |")
    lecture = [n for n in LECTURE if n is not None]
    ours = statistics.median(n for *_, n in rows)
    print(f"| median | {ours:g} | {statistics.median(lecture):g} |")


if __name__ == "__main__":
    main()
