"""The stage diffs a reader runs stay readable: the sizes docs/contributing.md quotes, by
benchmarks/stage_diffs.py."""
import importlib.util
import re

from conftest import ROOT


def stage_diffs():
    spec = importlib.util.spec_from_file_location("stage_diffs", ROOT / "benchmarks" / "stage_diffs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstrings_are_left_out_and_code_is_not(tmp_path):
    f = tmp_path / "9_x.py"
    f.write_text('"""Stage 9.\n\nNew: everything.\n"""\nimport os\n\nx = """not a module docstring"""\n')
    assert stage_diffs().without_docstring(f) == 'import os\n\nx = """not a module docstring"""\n'


# the project's ceilings (docs/contributing.md lists them with the lecture's sizes, what each
# diff carries beyond the lecture's code and why 3->4 has no room): above the lecture's own commits where our
# stages carry more (float16 for T4s, CPU defaults, MFU, long-run safety)
CEILINGS = {"0->1": 75, "1->2": 60, "2->3": 36, "3->4": 17, "4->5": 100, "5->6": 85, "6->7": 330,
            "7->8": 230}


def test_stage_diff_sizes():
    sizes = {f"{a[0]}->{b[0]}": n for a, b, n in stage_diffs().stage_diffs()}
    assert sizes.keys() == CEILINGS.keys() and all(n > 0 for n in sizes.values())
    over = {k: (sizes[k], CEILINGS[k]) for k in sizes if sizes[k] > CEILINGS[k]}
    assert not over, f"diff over its ceiling (changed, ceiling): {over}; see docs/contributing.md"


def test_contributing_quotes_the_measured_sizes():
    """docs/contributing.md's table gives each diff's changed lines, ceiling and lecture size: today's."""
    page = (ROOT / "docs" / "contributing.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:5] for line in page.splitlines() if re.match(r"\| \d→\d \|", line)]
    quoted = {diff.strip().replace("→", "->"): [int(x) if x.strip().isdigit() else None
                                                 for x in rest]  # 7->8: no lecture commit, "-"
              for diff, *rest in rows}
    module = stage_diffs()
    measured = {f"{a[0]}->{b[0]}": [n, CEILINGS[f"{a[0]}->{b[0]}"], lecture]
                for (a, b, n), lecture in zip(module.stage_diffs(), module.LECTURE)}
    assert quoted == measured, "update the row in docs/contributing.md (diff: changed, ceiling, lecture)"


def test_stage7_main_reads_like_the_lectures_script():
    """Stage 7's set-up, resume, checkpoint and evaluation code live in named functions: main() stays within
    160 lines (set-up, data, model, optimizer, then the loop with evaluation, the step and the log)."""
    import ast
    tree = ast.parse((ROOT / "7_train_ddp_fineweb.py").read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 160


def test_lines_fit_side_by_side():
    """Two stages side by side fit one screen: every line of the numbered stages, longrun.py,
    checkpoints.py, the tools and the benchmarks is at most 100 characters (docs/contributing.md)."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    long = [f"{f.name}:{n}" for f in files
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long}"
