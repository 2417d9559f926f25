"""The stage diffs a reader runs stay readable: the sizes README quotes, by benchmarks/stage_diffs.py."""
import importlib.util

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


# the project's ceilings (STYLE.md, "Shape of a stage diff"): above the lecture's own commits where our
# stages carry more (float16 for T4s, CPU defaults, MFU, long-run safety); README lists what each carries
CEILINGS = {"0->1": 75, "1->2": 60, "2->3": 36, "3->4": 17, "4->5": 100, "5->6": 85, "6->7": 330}


def test_stage_diff_sizes():
    sizes = {f"{a[0]}->{b[0]}": n for a, b, n in stage_diffs().stage_diffs()}
    assert sizes.keys() == CEILINGS.keys() and all(n > 0 for n in sizes.values())
    assert all(sizes[k] <= CEILINGS[k] for k in sizes), (sizes, CEILINGS)


def test_readme_quotes_the_measured_sizes():
    """README's stage table ends each stage's row with "ours / lecture's"; they are today's sizes."""
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `") and line.split("`")[1][:1].isdigit() and line.split("`")[1][0] != "0"]
    quoted = [line.rstrip(" |").rsplit("| ", 1)[1] for line in rows]
    module = stage_diffs()
    measured = [f"{n} / {lecture}" for (*_, n), lecture in zip(module.stage_diffs(), module.LECTURE)]
    assert quoted == measured


def test_stage7_main_reads_like_the_lectures_script():
    """Stage 7's set-up, resume, checkpoint and evaluation code live in named functions: main() stays within
    150 lines (set-up, data, model, optimizer, then the loop with evaluation, the step and the log)."""
    import ast
    tree = ast.parse((ROOT / "7_train_ddp_fineweb.py").read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 150
