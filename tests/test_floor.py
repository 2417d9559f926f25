"""requirements.txt is a tested floor: every requirement has a lower bound, torch's at most 2.6 (so a torch a
learner already has, on Colab or a GPU image, is kept), and the floor's run by benchmarks/floor.py is committed
for exactly these bounds. (floor.py itself builds a venv of several GB: not run here.)"""
import importlib.util

import pytest
from conftest import ROOT


def floor():
    spec = importlib.util.spec_from_file_location("floor", ROOT / "benchmarks" / "floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_requirement_has_a_lower_bound_and_torch_at_most_2_6():
    pins = dict(floor().floor_pins(ROOT / "requirements.txt"))
    assert {"torch", "numpy", "tiktoken", "transformers", "datasets", "tqdm", "matplotlib"} <= pins.keys()
    assert tuple(int(x) for x in pins["torch"].split(".")[:2]) <= (2, 6)


@pytest.mark.parametrize("line", ["torch==2.6.0", "torch", "torch<3"])
def test_a_requirement_without_a_lower_bound_is_one_clear_line(tmp_path, line):
    (tmp_path / "requirements.txt").write_text(f"# the floor\nnumpy>=1.24.0\n{line}  # why\n")
    with pytest.raises(SystemExit) as e:
        floor().floor_pins(tmp_path / "requirements.txt")
    assert str(e.value.code) == f"error: requirements.txt line 3: {line!r} is not `name>=version`; the floor " \
                                "needs a lower bound"


def test_the_committed_floor_run_is_of_these_bounds_and_passed():
    """The newest benchmarks/results/floor_*.txt ends with floor.py's line for today's requirements.txt:
    raise a bound, run `python benchmarks/floor.py` again and commit its output."""
    pins = floor().floor_pins(ROOT / "requirements.txt")
    runs = sorted((ROOT / "benchmarks" / "results").glob("floor_*.txt"))
    assert runs, "no benchmarks/results/floor_*.txt: run python benchmarks/floor.py"
    last = runs[-1].read_text(encoding="utf-8").rstrip().splitlines()[-1]
    assert last.startswith(f"# floor ({', '.join(f'{n} {v}' for n, v in pins)}): pytest "), last
    assert " passed" in last and " failed" not in last and " error" not in last and "keeps it" in last, last
