"""benchmarks/gpu_check.py, the one command a GPU session runs: its derived figures from hand-computed
tables, and its CPU rehearsal end to end (every part, every section of report.md, the raw files)."""
import importlib.util
import os
import re
import statistics
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, load, run_script

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
mfu = sys.modules["mfu"]  # benchmarks/mfu.py, which gpu_check imports
GPU_CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]


def figures(report):
    """The '## Figures' table of a report.md as {figure: value}."""
    table = report.split("## Figures", 1)[1]
    return dict(re.findall(r"^\| (.+?) \| (.*?) \|$", table, re.M)[1:])


@pytest.mark.parametrize("size", [(12, 12, 768), (2, 2, 32), (3, 4, 64)])
def test_flops_per_token_counts_the_models_own_weights(size):
    n_layer, n_head, n_embd = size
    m = load("5_train_speedup")
    config = m.GPTConfig(vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    if size == (12, 12, 768):  # 124M at T=1024: 6 * 123,689,472 + 12 * 12 * 768 * 1024
        assert mfu.n_matmul_params(config) == 123_689_472
        assert mfu.flops_per_token(config, 1024) == 855_383_040
    else:
        model = m.GPT(config)
        counted = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
        assert mfu.n_matmul_params(config) == counted


def test_peak_is_the_first_name_found_in_the_gpus_name():
    table = {"H100 PCIe": 756, "H100": 989, "A100": 312}  # in the stage scripts' order: the longer name first
    assert mfu.peak_tflops("NVIDIA H100 PCIe", table) == 756.0
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", table) == 989.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-40GB", table, tf32=True) == 156.0  # TF32: half of bf16
    assert mfu.peak_tflops("NVIDIA GeForce GTX 1080", table) is None
    assert mfu.peak_tflops("", table, override=100) == 100.0  # --peak-tflops wins, on any device


def test_largest_batch_per_card_from_a_measured_table():
    reserved = {1: 3.1, 2: 3.9, 4: 5.5, 8: 8.7, 16: 15.1, 32: 27.9, 64: 53.5}  # GiB, as the memory part measures
    # fits when reserved + 0.5 <= 0.94 * N: 8 -> 7.02, 12 -> 10.78, 16 -> 14.54, 24 -> 22.06, 40 -> 37.1, 80 -> 74.7
    got = [check.largest_batch(reserved, n, 0.5, 0.94) for n in (8, 12, 16, 24, 40, 80)]
    assert got == [(4, True), (8, True), (8, True), (16, True), (32, True), (64, False)]  # 64 fits: 128 unmeasured
    assert check.largest_batch(reserved, 2, 0.5, 0.94) == (None, True)  # not even B=1 (3.6 > 1.88)
    assert check.largest_batch({**reserved, 3: 4.0}, 8) == (4, True)  # not a power of two: never an answer
    assert check.fmt_b((64, False)) == ">= 64" and check.fmt_b((None, True)) == "none" and check.fmt_b((8, True)) == "8"


def test_hours_of_the_full_run_from_tok_per_s():
    # 19,073 x 524,288 = 9,999,745,024 tokens; at 500,000 tok/s: 19,999.49 s = 5.5554 h; 8 GPUs: 0.6944 h
    assert check.run_hours(500_000) == pytest.approx(5.55541, abs=1e-4)
    assert check.run_hours(500_000, gpus=8) == pytest.approx(0.694427, abs=1e-5)
    assert check.run_hours(1.5e6 / 8, gpus=8) == pytest.approx(1.85180, abs=1e-4)  # the lecture's 8 A100s


def test_parsers_read_what_the_parts_print():
    steps = "\n".join(f"step {n:5d} | loss 10.5 | dt {d:.2f} | tok/s {524288 / d * 1000:.0f} | lr 6e-05"
                      for n, d in enumerate([30000, 2000, 1200, 1100, 1000, 1150, 1050]))
    rows = check.parse_steps("noise\n" + steps + "\nvalidation loss: 10.9")
    assert [r["step"] for r in rows] == list(range(7)) and rows[0]["lr"] == 6e-05
    assert check.median_after(rows, "dt") == 1075.0  # steps 3-6: compilation and warm-up left out
    assert check.median_after(rows[:2], "dt") == statistics.median([30000, 2000])  # too few: all of them
    memory = ("| eager | 1 | 2.500 | 2.750 | 1.2 | 0.100 |\n| compile | 2 | 3.000 | 3.250 | 40.1 | 0.200 |\n"
              "OOM eager: B=256: CUDA out of memory\ncontext: 0.61 GiB in use outside PyTorch's caching allocator")
    rows, stops, context = check.parse_memory(memory)
    assert rows == {"eager": {1: (2.5, 2.75, 1.2)}, "compile": {2: (3.0, 3.25, 40.1)}}
    assert stops == ["OOM eager: B=256: CUDA out of memory"] and context == 0.61
    out = "F.s\nFAILED tests/test_gpu.py::test_a[x] - assert 0\n=== 1 failed, 1 passed, 1 skipped in 9.01s ==="
    assert check.parse_pytest(out) == ("1 failed, 1 passed, 1 skipped in 9.01s",
                                    {"failed": 1, "passed": 1, "skipped": 1}, ["tests/test_gpu.py::test_a[x]"])


def test_stage7_takes_the_lectures_batch_where_it_fits():
    def session(gib, compiled):
        return SimpleNamespace(args=SimpleNamespace(stage7_batch=None), full=True, device="cuda", gib=gib,
                               context=0.6, memory={"compile": compiled, "eager": {}})
    measured = {b: (0, 2.5 + 0.85 * b, 0) for b in (1, 2, 4, 8, 16, 32, 64, 128)}  # docs/hardware.md's estimate, in GiB
    assert check.Check.stage7_batch(session(139.8, measured))[0] == 64  # never more than the lecture's 64
    assert check.Check.stage7_batch(session(23.6, measured))[0] == 16  # 16: 16.1 + 0.6 <= 0.97 * 23.6; 32: 29.7 is not
    assert check.Check.stage7_batch(session(79.1, {}))[0] == 64  # nothing measured: docs/hardware.md's estimate


def test_prepare_copies_the_bpe_files_into_a_folder_that_travels(tmp_path):
    source = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not source or not check.bpe_present(source):
        pytest.skip("no GPT-2 BPE files here")
    dest = check.prepare(tmp_path / ".tiktoken_cache", source)
    for name in check.BPE_FILES:
        assert (dest / name).read_bytes() == (check.Path(source) / name).read_bytes()
    assert "/.tiktoken_cache/" in (ROOT / ".gitignore").read_text().splitlines()


def test_missing_bpe_files_are_one_line_and_skip_stage7(tmp_path):
    empty = tmp_path / "no_bpe"
    empty.mkdir()
    proc = run_script("gpu_check", "--out", tmp_path / "out", "--parts", "stage7", cmd=GPU_CHECK,
                      env={"TIKTOKEN_CACHE_DIR": str(empty)}, timeout=300)
    assert proc.returncode == 1
    assert check.BPE_ERROR in proc.stderr.splitlines()
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"skipped: {check.BPE_ERROR}" in report and figures(report)["stage7"] == "skipped (BPE files)"


def test_no_budget_left_skips_each_part_with_a_line(tmp_path):
    proc = run_script("gpu_check", "--out", tmp_path, "--budget-s", "0", cmd=GPU_CHECK, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert report.count("skipped: 0 s of --budget-s 0 left") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "versions.txt"]


def test_cpu_rehearsal_writes_every_section_figure_and_raw_file(tmp_path):
    """The whole sequence on the CPU with a tiny model (about a minute on 2 cores): what a GPU session
    runs, each part in its subprocess; the report's figures agree with the raw step lines."""
    out = tmp_path / "gc"
    proc = run_script("gpu_check", "--out", out, "--peak-tflops", "0.5", cmd=GPU_CHECK, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["memory.txt", "pytest.txt", "report.md", "speed.txt", "stage7.txt", "stage7_log.txt",
                     "versions.txt"]  # the device tool returns at most 8 files
    report = (out / "report.md").read_text()
    for section in ("## versions", "## pytest -m gpu", "## Memory by -B", "### Largest -B by GPU memory",
                    "## Stage 7 at the full-run setting", "### The full run", "## The lecture's speed table",
                    "## Figures"):
        assert section in report, section
    assert "CPU rehearsal" in report and "every part ran cleanly" in report
    fig = figures(report)
    assert "skipped" in fig["pytest -m gpu, all but the out-of-memory test"]  # no CUDA: skips, no failures
    assert "skipped" in fig["pytest -m gpu, out-of-memory test alone"]
    assert [fig[f"memory -B {b} eager reserved GiB"] for b in (1, 2, 4, 8)]
    assert all(fig[f"largest -B eager, {g} GB"] for g in check.CARDS_GB)
    for name in ("4_ fp32 eager", "+ bf16 autocast", "+ vocab 50304 (= 5_)", "6_ recipe"):
        assert "ms/step" in fig[f"speed: {name}"] and "MFU" in fig[f"speed: {name}"]
    # the figures are the raw step lines' medians (steps 3-19), their MFU and their hours
    rows = check.parse_steps((out / "stage7.txt").read_text())
    assert [r["step"] for r in rows] == list(range(20))
    tok = statistics.median(r["tok/s"] for r in rows[3:])
    assert fig["stage 7 tok/s (median)"] == f"{tok:,.0f}"
    config = SimpleNamespace(n_layer=2, n_embd=32, vocab_size=50304)
    assert fig["stage 7 MFU %"] == f"{tok * mfu.flops_per_token(config, 64) / 0.5e12 * 100:.1f}"
    assert fig["full run hours, this device"] == f"{check.run_hours(tok):.1f}"
    assert "train" in (out / "stage7_log.txt").read_text()
