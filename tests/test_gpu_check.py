"""benchmarks/gpu_check.py, the one command a GPU session runs: its derived figures from
hand-computed tables; its scheduler in process, with fake parts that take too long (the order, each
part's share of the budget, what a cut part keeps, the report's first line, Ctrl-C, --out and flag
errors); and one short CPU rehearsal end to end (slow: every real part, every report section)."""
import importlib.util
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, load, main_error, run_script

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
mfu = sys.modules["mfu"]  # benchmarks/mfu.py, which gpu_check imports
GPU_CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
PROBED = {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "machine": "x86_64",
          "cpus": 16, "bpe": True, "xdist": True, "pytest_timeout": True}  # the probe says more
H100 = dict(PROBED, gpu="NVIDIA H100 80GB HBM3", gpu_count=1, memory_gib=79.1, capability="9.0",
            sms=132, bf16_native=True, peak_tflops=989.0, peak_key="H100")


def figures(report):
    """The '## Figures' table of a report.md as {figure: value}."""
    table = report.split("## Figures", 1)[1]
    return dict(re.findall(r"^\| (.+?) \| (.*?) \|$", table, re.M)[1:])


# ---------------------------------------------------------------------------- derived figures


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
    table = {"H100 PCIe": 756, "H100": 989, "A100": 312}  # the stage scripts' order: longer first
    assert mfu.peak_tflops("NVIDIA H100 PCIe", table) == 756.0
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", table) == 989.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-40GB", table, tf32=True) == 156.0  # TF32: half of bf16
    assert mfu.peak_tflops("NVIDIA GeForce GTX 1080", table) is None
    assert mfu.peak_tflops("", table, override=100) == 100.0  # --peak-tflops wins, on any device


def test_largest_batch_per_card_from_a_measured_table():
    reserved = {1: 3.1, 2: 3.9, 4: 5.5, 8: 8.7, 16: 15.1, 32: 27.9, 64: 53.5}  # GiB, as measured
    # fits when reserved + 0.5 <= 0.94 * N: 8 -> 7.02, 12 -> 10.78, 16 -> 14.54, 24 -> 22.06,
    # 40 -> 37.1, 80 -> 74.7
    got = [check.largest_batch(reserved, n, 0.5, 0.94) for n in (8, 12, 16, 24, 40, 80)]
    assert got == [(4, True), (8, True), (8, True), (16, True), (32, True), (64, False)]  # 128: ?
    assert check.largest_batch(reserved, 2, 0.5, 0.94) == (None, True)  # not even B=1 (3.6 > 1.88)
    assert check.largest_batch({**reserved, 3: 4.0}, 8) == (4, True)  # 3: not a power of two
    assert check.fmt_b((64, False)) == ">= 64" and check.fmt_b((None, True)) == "none"
    assert check.fmt_b((8, True)) == "8"


def test_hours_of_the_full_run_from_tok_per_s():
    # 19,073 x 524,288 = 9,999,745,024 tokens; at 500,000 tok/s: 19,999.49 s = 5.5554 h;
    # on 8 GPUs: 0.6944 h
    assert check.run_hours(500_000) == pytest.approx(5.55541, abs=1e-4)
    assert check.run_hours(500_000, gpus=8) == pytest.approx(0.694427, abs=1e-5)
    assert check.run_hours(1.5e6 / 8, gpus=8) == pytest.approx(1.85180, abs=1e-4)  # lecture's A100s


def test_parsers_read_what_the_parts_print():
    steps = "\n".join(f"step {n:5d} | loss 10.5 | dt {d:.2f} | tok/s {524288 / d * 1000:.0f} | "
                      "lr 6e-05" for n, d in enumerate([30000, 2000, 1200, 1100, 1000, 1150, 1050]))
    rows = check.parse_steps("noise\n" + steps + "\nvalidation loss: 10.9")
    assert [r["step"] for r in rows] == list(range(7)) and rows[0]["lr"] == 6e-05
    assert check.median_after(rows, "dt") == 1075.0  # steps 3-6: compilation and warm-up left out
    assert check.median_after(rows[:2], "dt") == statistics.median([30000, 2000])  # too few: all
    memory = ("| eager | 1 | 2.500 | 2.750 | 1.2 | 0.100 |\n"
              "| compile | 2 | 3.000 | 3.250 | 40.1 | 0.200 |\n"
              "OOM eager: B=256: CUDA out of memory\n"
              "context: 0.61 GiB in use outside PyTorch's caching allocator")
    rows, stops, context = check.parse_memory(memory)
    assert rows == {"eager": {1: (2.5, 2.75, 1.2)}, "compile": {2: (3.0, 3.25, 40.1)}}
    assert stops == ["OOM eager: B=256: CUDA out of memory"] and context == 0.61
    out = ("F.s\nFAILED tests/test_gpu.py::test_a[x] - assert 0\n"
           "=== 1 failed, 1 passed, 1 skipped in 9.01s ===")
    assert check.parse_pytest(out) == ("1 failed, 1 passed, 1 skipped in 9.01s",
                                       {"failed": 1, "passed": 1, "skipped": 1},
                                       ["tests/test_gpu.py::test_a[x]"])
    # `pytest -v` lines, plain and under pytest-xdist: what a run stopped before its summary did
    progress = ("tests/test_gpu.py::test_a[1_gpt2_hf_eval] PASSED          [  5%]\n"
                "[gw1] [ 11%] FAILED tests/test_gpu.py::test_b[7_train] \n"
                "[gw0] [ 17%] SKIPPED tests/test_gpu.py::test_c \n"
                "FAILED tests/test_gpu.py::test_b[7_train] - assert 0")  # -rf repeats it
    assert check.parse_progress(progress) == {"tests/test_gpu.py::test_a[1_gpt2_hf_eval]": "PASSED",
                                              "tests/test_gpu.py::test_b[7_train]": "FAILED",
                                              "tests/test_gpu.py::test_c": "SKIPPED"}


def test_stage7_takes_the_lectures_batch_where_it_fits():
    def session(gib):
        return SimpleNamespace(args=SimpleNamespace(stage7_batch=None), full=True, device="cuda",
                               gib=gib)
    # docs/hardware.md's estimate, 2.5 GB + 0.85 GB per sequence, against 0.9 of the GPU
    assert check.Check.stage7_batch(session(139.8))[0] == 64  # never more than the lecture's 64
    assert check.Check.stage7_batch(session(79.1))[0] == 64  # an H100: 56.9 GB <= 76.4
    assert check.Check.stage7_batch(session(23.6))[0] == 16  # 16: 16.1 GB <= 22.8; 32: 29.7 is not


def test_bench_speedup_starts_no_warm_up_it_expects_to_end_past_the_deadline():
    bench = load("benchmarks.bench_speedup")
    variants = [{"compiled": False, "warmup_s": 3.0}, {"compiled": False, "warmup_s": 5.0}]
    assert bench.expected_warmup(variants, False, 60) == 5.0  # the slowest eager one so far
    assert bench.expected_warmup(variants, True, 60) == 60  # no compiled one yet: the guess
    variants.append({"compiled": True, "warmup_s": 41.0})
    assert bench.expected_warmup(variants, True, 60) == 41.0


def test_bench_memory_can_start_its_sweep_at_two():
    bench = load("benchmarks.bench_memory")
    assert bench.batches(16, compiled=True) == [2, 4, 8, 16, 1]  # B=1 compiles on its own, last
    assert bench.batches(16, compiled=True, min_batch=2) == [2, 4, 8, 16]
    assert bench.batches(8, compiled=False, min_batch=2) == [2, 4, 8]


def test_prepare_copies_the_bpe_files_into_a_folder_that_travels(tmp_path):
    source = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not source or not check.bpe_present(source):
        pytest.skip("no GPT-2 BPE files here")
    dest = check.prepare(tmp_path / ".tiktoken_cache", source)
    for name in check.BPE_FILES:
        assert (dest / name).read_bytes() == (check.Path(source) / name).read_bytes()
    assert "/.tiktoken_cache/" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_gpu_test_lives_in_the_file_the_check_runs():
    """gpu_check collects only tests/test_gpu.py (collecting every file costs each xdist worker
    seconds): a `gpu` test anywhere else would never run there."""
    marked = re.compile(r"^(@|pytestmark\b.*)pytest\.mark\.gpu\b", re.M)
    others = [p.name for p in (ROOT / "tests").glob("test_*.py")
              if p.name != "test_gpu.py" and marked.search(p.read_text())]
    assert marked.search((ROOT / "tests" / "test_gpu.py").read_text())
    assert (ROOT / check.GPU_TESTS).is_file() and others == []


# ------------------------------------------------------------------------ the scheduler, in process


def fake_check(tmp_path, *argv, device="cuda", info=None):
    """A Check whose probe is faked (an H100, or the CPU) and whose parts the test sets."""
    args = check.parse_args(["--out", str(tmp_path / "out"), *map(str, argv)])
    c = check.Check(args, list(map(str, argv)))

    def versions():
        c.info, c.device = dict(H100 if device == "cuda" else PROBED, **(info or {})), device
        c.set_device()
        c.versions_run = SimpleNamespace(seconds=0.0)
        path = c.tmp / "versions.txt"
        path.write_text("a fake probe\n")
        return path

    c.versions = versions
    return c


def slow_part(c, log, name):
    """A part that prints a figure at once, then would run for a minute: its cap ends it."""
    def part(raw):
        log.append((name, c.deadline - time.time(), c.deadline))
        r = c.run(["sh", "-c", f"echo measured {name}; exec sleep 60"], raw, 1000)
        return check.outcome(r.text, [(name, "x")], "cut" if r.rc is None else "ok",
                             check.status(r))
    return part


def first_line(c):
    return (c.out / "report.md").read_text().splitlines()[0]


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_parts_run_in_order_each_cut_at_its_share_keeping_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(check.MIN_PART_S, "gpu", 0.2)
    budget = 3.0
    c = fake_check(tmp_path, "--budget-s", budget)
    log = []
    for name in check.PARTS:
        setattr(c, name, slow_part(c, log, name))
    t0 = time.time()
    assert c.main() == 1
    took = time.time() - t0
    assert [entry[0] for entry in log] == ["stage7", "speed", "memory", "pytest"]  # most needed 1st
    # the probe is instant here: the parts share all the budget; each cap ends where its share of
    # the budget ends (a part that overran by a few ms takes them from the next one, not the end)
    assert log[0][1] == pytest.approx(check.SHARES["stage7"] * budget, abs=0.2)
    for before, (name, _, end) in zip(log, log[1:]):
        assert end - before[2] == pytest.approx(check.SHARES[name] * budget, abs=0.05), name
    assert sum(check.SHARES.values()) == pytest.approx(1.0)  # the caps add up to the budget
    assert took < budget + 1.5, took
    head = first_line(c)
    assert head.startswith("# GPU check on NVIDIA H100 80GB HBM3: NOT COMPLETE: stage7 cut (killed")
    assert all(f"{p} cut" in head for p in check.PARTS) and "ok:" not in head
    report = (c.out / "report.md").read_text()
    for name in check.PARTS:  # each cut part kept what it had measured
        assert f"measured {name}" in report
        assert f"measured {name}" in (c.out / check.RAW_FILES[name]).read_text()


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_time_a_part_leaves_goes_to_the_next(tmp_path, monkeypatch):
    monkeypatch.setitem(check.MIN_PART_S, "gpu", 0.2)
    c = fake_check(tmp_path, "--budget-s", 2)
    log = []
    c.stage7 = lambda raw: log.append(("stage7", 0, 0)) or check.outcome("done")
    for name in check.PARTS[1:]:
        setattr(c, name, slow_part(c, log, name))
    c.main()
    s = check.SHARES
    assert log[1][1] == pytest.approx(2 * (s["stage7"] + s["speed"]), abs=0.3)  # + stage7's share
    assert "stage7 cut" not in first_line(c) and "complete: stage7" in first_line(c)


def test_ok_only_when_every_part_is_complete(tmp_path):
    c = fake_check(tmp_path, "--budget-s", 100)
    for name in check.PARTS:
        setattr(c, name, lambda raw: check.outcome("fine"))
    assert c.main() == 0
    assert first_line(c) == "# GPU check on NVIDIA H100 80GB HBM3: ok: all 4 parts complete " \
                            "(stage7, speed, memory, pytest)"
    assert "- GPU: NVIDIA H100 80GB HBM3 (1 visible), 79.1 GiB, compute capability 9.0, 132 SMs, " \
           "native bf16: yes" in (c.out / "report.md").read_text()
    c = fake_check(tmp_path / "subset", "--budget-s", 100, "--parts", "stage7")
    c.stage7 = lambda raw: check.outcome("fine")
    assert c.main() == 0  # what was asked for is complete; the line still says what was not run
    assert first_line(c).endswith(": PARTIAL: not requested (--parts): speed, memory, pytest; "
                                  "complete: stage7")


def test_no_budget_left_skips_each_part_with_a_line(tmp_path):
    c = fake_check(tmp_path, "--budget-s", 0)
    assert c.main() == 1
    report = (c.out / "report.md").read_text()
    assert report.count("skipped: 0 s of --budget-s 0 left") == 4
    assert first_line(c).endswith("NOT COMPLETE: stage7 skipped (0 s left); speed skipped (0 s "
                                  "left); memory skipped (0 s left); pytest skipped (0 s left)")
    assert sorted(p.name for p in c.out.iterdir()) == ["report.md", "versions.txt"]


def test_missing_bpe_files_are_one_line_and_skip_stage7(tmp_path, capsys):
    c = fake_check(tmp_path, "--budget-s", 100, info={"bpe": False})
    ran = []
    for name in check.PARTS:
        setattr(c, name, lambda raw, name=name: ran.append(name) or check.outcome("fine"))
    assert c.main() == 1
    assert check.BPE_ERROR in capsys.readouterr().err.splitlines()
    report = (c.out / "report.md").read_text()
    assert f"skipped: {check.BPE_ERROR}" in report
    assert figures(report)["stage7"] == "skipped (BPE files)"
    assert ran == ["speed", "memory", "pytest"]
    assert "stage7 skipped (GPT-2's BPE files missing)" in first_line(c)


def test_ctrl_c_stops_the_part_and_still_writes_the_report(tmp_path, capsys):
    c = fake_check(tmp_path, "--budget-s", 100)
    c.stage7 = lambda raw: check.outcome("stage 7 measured", [("stage 7 tok/s", "1")])
    children, ran = [], []

    def speed(raw):  # Ctrl-C arrives while the part's subprocess runs
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        r = c.run(["sh", "-c", "echo two rows timed; echo $$; exec sleep 60"], raw, 1000)
        children.append(int(r.text.split()[-1]))
        return check.outcome(r.text, state="cut", note=check.status(r))

    c.speed = speed
    c.memory = c.pytest = lambda raw: ran.append("later") or check.outcome("")
    t0 = time.time()
    assert c.main() == 130
    assert time.time() - t0 < 5 and ran == []  # nothing more starts
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        f"gpu_check: stopped by Ctrl-C during speed; what was measured is in {c.out / 'report.md'}"
    with pytest.raises(ProcessLookupError):  # the part's subprocess was ended with it
        os.kill(children[0], 0)
    report = (c.out / "report.md").read_text()
    assert first_line(c).startswith("# GPU check on NVIDIA H100 80GB HBM3: STOPPED by Ctrl-C "
                                    "during speed: speed cut (stopped (Ctrl-C)); memory not run "
                                    "yet; pytest not run yet; complete: stage7")
    assert "stage 7 measured" in report and "two rows timed" in report
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_stops_at_once_with_the_report(tmp_path, capsys):
    c = fake_check(tmp_path, "--budget-s", 100)
    c.stage7 = lambda raw: check.outcome("stage 7 measured")

    def speed(raw):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second one raises KeyboardInterrupt here
        time.sleep(5)
        raise AssertionError("not reached")

    c.speed = speed
    assert c.main() == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "stopped by Ctrl-C during speed" in err.strip().splitlines()[-1]
    assert "STOPPED by Ctrl-C during speed" in first_line(c)
    assert "stage 7 measured" in (c.out / "report.md").read_text()


def test_a_report_folder_gone_mid_run_is_one_line_and_the_report_on_stdout(tmp_path, capsys):
    c = fake_check(tmp_path, "--budget-s", 100)

    def stage7(raw):
        import shutil
        shutil.rmtree(c.out)  # or a full disk: report.md cannot be written any more
        return check.outcome("stage 7 measured", [("stage 7 tok/s", "123")])

    c.stage7 = stage7
    assert c.main() == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: No such file or directory (")
    assert "stage 7 measured" in out and "| stage 7 tok/s | 123 |" in out  # nothing lost


# ---------------------------------------------------------------------------- the parts' outcomes


def fake_run(c, answer):
    """c.run replaced: answer(cmd) gives (output, rc); rc None: killed at the part's cap."""
    calls = []

    def run(cmd, raw, timeout, poll=None):
        calls.append([str(a) for a in cmd])
        text, rc = answer(calls[-1])
        return SimpleNamespace(rc=rc, stopped=False, seconds=1.0, timeout=timeout, text=text,
                               lines=[(0.5, line) for line in text.splitlines()])
    c.run = run
    return calls


def ready(tmp_path, cap=100, **kw):
    c = fake_check(tmp_path, **kw)
    c.versions()
    c.out = tmp_path / "out"
    c.out.mkdir(exist_ok=True)
    c.deadline = time.time() + cap
    return c


def steps_text(n, first_dt=40000.0):
    return "\n".join(f"step {k:5d} | loss 10.9 | dt {first_dt if k == 0 else 1300.0:.2f} | tok/s "
                     f"{524288 / (first_dt if k == 0 else 1300) * 1000:.0f}" for k in range(n))


def test_stage7_halves_b_until_it_fits(tmp_path):
    c = ready(tmp_path)

    def answer(cmd):
        if "make_bench_shards.py" in cmd[1]:
            return "wrote 3 shards", 0
        B = int(cmd[cmd.index("-B") + 1])
        if B > 32:
            return f"error: out of memory at -B {B} -T 1024 on cuda; try -B {B // 2} (...)", 1
        return steps_text(12), 0

    calls = fake_run(c, answer)
    result = c.stage7(None)
    assert [cmd[cmd.index("-B") + 1] for cmd in calls[1:]] == ["64", "32"]
    assert result.state == "ok" and "-B 32: -B 64 ran out of memory" in result.body
    assert dict(result.figures)["stage 7 tok/s (median)"] == f"{524288 / 1.3:,.0f}"


def test_stage7_cut_at_its_cap_reports_the_steps_it_measured(tmp_path):
    c = ready(tmp_path)
    fake_run(c, lambda cmd: ("wrote", 0) if "make_bench_shards.py" in cmd[1] else
             (steps_text(7), None))
    result = c.stage7(None)
    assert result.state == "cut" and result.note == "killed at its 100 s limit after 7 of 12 steps"
    assert "tok/s, median of steps 3-6" in result.body
    assert "full run hours, this device" in dict(result.figures)


def test_speed_cut_by_its_deadline_names_the_rows_not_timed(tmp_path):
    c = ready(tmp_path)
    table = ("warm-up 4_ fp32 eager: 3.1 s\npast --deadline-s 125 (the next warm-up would take "
             "~60 s): not timed: + vocab 50304 (= 5_), 6_ recipe, fused AdamW\n\n"
             "124M, B=16, T=1024\n| variant | ms/step | tok/s | vs 4_ | MFU | compile s |\n"
             "| --- | ---: | ---: | ---: | ---: | ---: |\n"
             "| 4_ fp32 eager | 300.0 | 54,613 | 1.00x | - | - |\n"
             "| + TF32 | 100.0 | 163,840 | 3.00x | 10.0% | - |")
    fake_run(c, lambda cmd: (table, 0))
    result = c.speed(None)
    assert result.state == "cut"
    assert result.note == "2 rows timed, not timed: + vocab 50304 (= 5_), 6_ recipe, fused AdamW"
    assert "speed: + TF32" in dict(result.figures)
    fake_run(c, lambda cmd: ("warm-up 4_ fp32 eager: 3.1 s\nwarm-up + TF32: 1.2 s", None))  # killed
    result = c.speed(None)
    assert result.state == "cut" and "- warm-up + TF32: 1.2 s" in result.body


def test_memory_cut_keeps_its_rows(tmp_path):
    c = ready(tmp_path)
    rows = ("| eager | 2 | 3.000 | 3.250 | 1.0 | 0.200 |\n"
            "| eager | 4 | 4.500 | 4.750 | 1.0 | 0.300 |")
    calls = fake_run(c, lambda cmd: (rows, None))
    result = c.memory(None)
    assert "--min-batch" in calls[0] and result.state == "cut"
    assert dict(result.figures)["memory -B 4 eager reserved GiB"] == "4.75"
    assert "| largest -B, eager (--no-compile) |" in result.body


def test_pytest_cut_reports_the_tests_done_so_far(tmp_path):
    c = ready(tmp_path)
    out = ("[gw0] [ 10%] PASSED tests/test_gpu.py::test_a \n"
           "[gw1] [ 20%] PASSED tests/test_gpu.py::test_b \n"
           "[gw2] [ 30%] FAILED tests/test_gpu.py::test_c ")
    calls = fake_run(c, lambda cmd: (out, None))
    result = c.pytest(None)
    assert calls[0][3] == check.GPU_TESTS and "-n" in calls[0]
    assert result.state == "cut" and "so far: 1 failed, 2 passed" in result.note
    assert "`tests/test_gpu.py::test_c`" in result.body


# ---------------------------------------------------------------------------- bad input: one line


def test_out_that_is_a_file_or_cannot_be_written_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(check.Check, "versions", lambda self: pytest.fail("the probe started"))
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    line = main_error(check, ["--out", a_file])
    assert line == f"error: --out {a_file} is a file; pass a folder (it is created if missing)"
    assert "cannot write there" in main_error(check, ["--out", a_file / "sub"])
    assert a_file.read_text() == "keep me"
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    elif Path("/sys").is_dir():  # root writes into a mode-555 folder; /sys refuses even root
        read_only = Path("/sys")
    else:
        pytest.skip("no folder here that this user cannot write to")
    line = main_error(check, ["--out", read_only])
    assert line.startswith(f"error: --out {read_only}: cannot write there (")
    assert "pass a folder" in line
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.md").write_text("an earlier check")
    assert "already holds" in main_error(check, ["--out", earlier])
    assert (earlier / "report.md").read_text() == "an earlier check"  # nothing overwritten


@pytest.mark.parametrize("argv, needle", [
    (["--budget-s", "inf"], "argument --budget-s: got inf; pass a finite number of at least 0"),
    (["--budget-s", "-5"], "argument --budget-s: got -5; pass a finite number of at least 0"),
    (["--budget-s", "eight minutes"], "argument --budget-s: got eight minutes"),
    (["--steps", "1e3"], "argument --steps: got 1e3; pass an integer of at least 1"),
    (["--stage7-batch", "48"], "argument --stage7-batch: got 48; pass a power of two up to 512"),
    (["--peak-tflops", "0"], "argument --peak-tflops: got 0; pass a finite number above 0"),
    (["--peak-tflops", "nan"], "argument --peak-tflops: got nan"),
    (["--parts", "stage7,gpu"], "--parts: unknown gpu; choose from stage7,speed,memory,pytest"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_flag_is_one_line(argv, needle, monkeypatch):
    monkeypatch.setattr(check.Check, "main", lambda self: pytest.fail("the check started"))
    assert needle in main_error(check, argv)


def test_numbers_in_any_float_spelling_are_taken():
    args = check.parse_args(["--budget-s", "1e3", "--peak-tflops", "9.89e2",
                             "--parts", "memory,stage7"])
    assert args.budget_s == 1000.0 and args.peak_tflops == 989.0
    assert args.parts == ["stage7", "memory"]  # always in the order of PARTS


# ---------------------------------------------------------------------------- docs


def test_the_gpu_run_instructions_match_the_code():
    """docs/hardware.md and benchmarks/README.md give the code's command, budget and order."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    hardware = (ROOT / "docs" / "hardware.md").read_text()
    section = readme.split("## The GPU check", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| ", section, re.M)
    assert [r for r in rows if r in check.PARTS + ("versions",)] == ["versions", *check.PARTS]
    for text in (section, hardware):
        assert "python benchmarks/gpu_check.py" in text
        assert f"{check.BUDGET_S // 60} minutes" in text
    assert f"`--budget-s`, {check.BUDGET_S} by default" in section
    assert f"{check.STEPS['gpu']} steps" in section
    shares = " / ".join(f"{v * 100:.0f}" for v in check.SHARES.values())
    assert f"its share of the budget ({shares} % of" in section


# -------------------------------------------------------------------- the real thing, on the CPU


@pytest.mark.slow
def test_cpu_rehearsal_writes_every_section_figure_and_raw_file(tmp_path):
    """The whole sequence on the CPU with a tiny model, each part in its subprocess, as a GPU
    session runs it; the report's figures agree with the raw step lines."""
    out = tmp_path / "gc"
    proc = run_script("gpu_check", "--out", out, "--peak-tflops", "0.5", cmd=GPU_CHECK, timeout=600,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["memory.txt", "pytest.txt", "report.md", "speed.txt", "stage7.txt",
                     "stage7_log.txt", "versions.txt"]  # the device tool returns at most 8 files
    report = (out / "report.md").read_text()
    assert report.splitlines()[0] == "# GPU check on CPU (rehearsal): ok: all 4 parts complete " \
                                     "(stage7, speed, memory, pytest)"
    sections = ["## versions", "## Stage 7 at the full-run setting", "### The full run",
                "## The lecture's speed table", "## Memory by -B", "### Largest -B by GPU memory",
                "## pytest -m gpu", "## Figures"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "CPU rehearsal" in report
    fig = figures(report)
    assert "skipped" in fig["pytest -m gpu, every gpu test (no CUDA: all skip)"]
    assert [fig[f"memory -B {b} eager reserved GiB"] for b in (1, 2)]
    assert all(fig[f"largest -B eager, {g} GB"] for g in check.CARDS_GB)
    for name in ("4_ fp32 eager", "+ bf16 autocast", "+ vocab 50304 (= 5_)", "6_ recipe"):
        assert "ms/step" in fig[f"speed: {name}"] and "MFU" in fig[f"speed: {name}"]
    # the figures are the raw step lines' medians (steps 3-5), their MFU and their hours
    rows = check.parse_steps((out / "stage7.txt").read_text())
    assert [r["step"] for r in rows] == list(range(check.STEPS["cpu"]))
    tok = statistics.median(r["tok/s"] for r in rows[3:])
    assert fig["stage 7 tok/s (median)"] == f"{tok:,.0f}"
    config = SimpleNamespace(n_layer=2, n_embd=32, vocab_size=50304)
    assert fig["stage 7 MFU %"] == f"{tok * mfu.flops_per_token(config, 64) / 0.5e12 * 100:.1f}"
    assert fig["full run hours, this device"] == f"{check.run_hours(tok):.1f}"
    assert "train" in (out / "stage7_log.txt").read_text()
