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


def test_stage_diff_sizes():
    """Ceilings at the lecture's sizes where we meet them (2->3, 3->4, 6->7 <= 330), so a change
    that bloats a diff fails here; the others are README's open item."""
    sizes = {f"{a[0]}->{b[0]}": n for a, b, n in stage_diffs().stage_diffs()}
    assert len(sizes) == 7 and all(n > 0 for n in sizes.values())
    assert sizes["2->3"] <= 47 and sizes["3->4"] <= 47 and sizes["6->7"] <= 330, sizes
