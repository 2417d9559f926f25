"""The hardware learners own, on CPU: float16 + GradScaler (T4, V100, RTX 20xx), the autocast
dtype chosen from what torch reports (MPS, pre-Ampere GPUs), the out-of-memory line, and
torchrun's multi-node launch (two "nodes" on loopback)."""
import contextlib
import functools
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch
from conftest import (ROOT, SCRIPTS, TINY, child_env, existing, load, load_fresh, main_losses, main_steps, parse_steps,
                      write_shards)
from test_ddp import NAME, RUN, run7

FAST = existing(SCRIPTS[5:])  # stages 5-7 have --dtype
CPU = TINY + ["--device", "cpu", "-B", "2", "-T", "32", "--no-compile", "--num-return-sequences", "1", "--max-length", "9"]


def stage_args(name, tmp_path):
    """Stages 5-6 train on input.txt; stage 7 on shards, with one B*T batch per step."""
    if name == NAME:
        shards = write_shards(tmp_path / "shards", [3001, 5003])
        (tmp_path / "no_hellaswag.jsonl").write_text("")
        return ["--data-dir", shards, "--log-dir", tmp_path / "log", "--eval-every", "1000", "--val-tokens", "1",
                "--hellaswag-file", tmp_path / "no_hellaswag.jsonl", "--total-batch-size", "64"]
    return ["--total-batch-size", "64"] if name != "5_train_speedup" else []


@pytest.mark.slow  # float16 on a CPU is emulated: seconds per run
@pytest.mark.parametrize("name", FAST)
def test_float16_with_grad_scaler_tracks_float32(name, tmp_path):
    """A dozen steps of float16 autocast + GradScaler stay within 0.05 of float32's losses, and are not
    float32's: the losses main returns (full precision) differ at some step. Printed to 6 decimals they can
    agree at a step (torch 2.6: step 0 to the last digit); the gap is a few float32 ulps on this tiny model."""
    m, args = load(name), CPU + stage_args(name, tmp_path) + ["--steps", "12"]
    out, rows, fp16 = main_losses(m, args + ["--dtype", "float16"] +
                                  (["--log-dir", tmp_path / "log16"] if name == NAME else []))
    assert "autocast fp16 + grad scaler" in out
    _, _, fp32 = main_losses(m, args + ["--dtype", "float32"])
    assert len(fp16) == len(fp32) == len(rows) == 12 and not any("skipped" in r for r in rows)
    assert any(a != b for a, b in zip(fp16, fp32)), "float16 is not on: its losses are float32's to the bit"
    for a, b in zip(fp16, fp32):
        assert a == pytest.approx(b, abs=0.05)
    if name != NAME:  # stage 7's shards here are random tokens: nothing to learn
        assert fp16[-1] < fp16[0] - 0.1  # it trains


@pytest.mark.slow  # float16 on a CPU is emulated: seconds per run
@pytest.mark.parametrize("name", existing(SCRIPTS[5:7]))
def test_step_with_inf_gradients_is_skipped_not_applied(name, tmp_path, monkeypatch):
    """With a loss scale so large that float16 gradients overflow, the scaler skips the update
    and halves the scale until the gradients fit. Every batch here is the same batch, so a step
    changed the weights exactly when the next step's loss differs."""
    text = tmp_path / "same.txt"
    text.write_text(" a" * 2000)  # every token is " a"
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    _, rows = main_steps(load(name), CPU + stage_args(name, tmp_path) +
                         ["--input", text, "--dtype", "float16", "--steps", "10"])
    skipped = [r.get("skipped") == 1 for r in rows]
    assert skipped[:3] == [True] * 3 and not all(skipped)  # 2**20 overflows; 2**(20-k) at last fits
    for r, after in zip(rows, rows[1:]):
        assert (r["loss"] == after["loss"]) == (r.get("skipped") == 1)  # skipped <=> not applied
        if "norm" in r:  # stage 6 prints the norm of the unscaled gradients: inf/nan when skipped
            assert math.isfinite(r["norm"]) != (r.get("skipped") == 1)


@pytest.mark.slow  # five starts of main, each tokenising input.txt: over a second
@pytest.mark.parametrize("name", FAST)
def test_default_dtype_is_bf16_only_where_the_cpu_computes_it(name, tmp_path, monkeypatch, capsys):
    """Emulated bf16 is slower than float32 (a CPU without AVX512-BF16 or AMX: stage 5 took 2.8x stage 4's
    time per step there), so the default is bf16 only where the chip has it; --dtype still decides. Each
    run stops where the model would be built, after its settings line (test_bf16_autocast_trains_on_cpu
    and test_float16_with_grad_scaler_tracks_float32 train in those dtypes)."""
    m, args = load(name), CPU + stage_args(name, tmp_path)
    monkeypatch.setattr(m, "GPT", lambda config: (_ for _ in ()).throw(SettingsPrinted()))

    def settings(*extra):
        with pytest.raises(SettingsPrinted):
            m.main([str(a) for a in args + list(extra)])
        return capsys.readouterr().out

    for avx512_bf16, amx in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        native = avx512_bf16 or amx
        assert m.native_bf16("cpu") == native
        assert ("autocast bf16 |" if native else "autocast off (float32) |") in settings()
    assert "autocast bf16 |" in settings("--dtype", "bfloat16")  # asked for: emulated or not
    assert "autocast fp16 + grad scaler |" in settings("--dtype", "float16")


@pytest.mark.parametrize("name", FAST)
def test_a_torch_without_the_private_cpu_checks_trains_in_float32(name, tmp_path, monkeypatch):
    """torch.cpu._is_avx512_bf16_supported and _is_amx_tile_supported are private (torch 2.4 lacks the first):
    a missing one counts as "not native", so a CPU run trains in float32 and its settings line says so."""
    m = load(name)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert m.native_bf16("cpu")  # the check this torch has still counts
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not m.native_bf16("cpu")
    args = CPU + stage_args(name, tmp_path) + ["--steps", "2"]
    out, rows = main_steps(m, args)
    assert "autocast off (float32) |" in out and len(rows) == 2


class SettingsPrinted(Exception):
    """Raised where the model would be built: the test has seen the settings line."""


@pytest.mark.parametrize("name", FAST)
def test_a_torch_without_has_triton_runs_eager_on_a_gpu(name, tmp_path, monkeypatch, capsys):
    """torch.utils._triton.has_triton is private: where torch lacks it the script still imports, and on a GPU
    (torch.cuda made to say it has one; the run stops where the model would be built) it runs eager and says so."""
    monkeypatch.setitem(sys.modules, "torch.utils._triton", None)  # its import raises ImportError
    m = load_fresh(name)
    assert m.has_triton() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(m, "native_bf16", lambda device_type: False)  # (asks the GPU that is not there)
    monkeypatch.setattr(m, "GPT", lambda config: (_ for _ in ()).throw(SettingsPrinted()))
    with pytest.raises(SettingsPrinted):  # no --no-compile: on a GPU compile is on by default
        m.main([str(a) for a in TINY + ["--device", "cuda", "-B", "2", "-T", "32"] + stage_args(name, tmp_path)])
    out = capsys.readouterr().out
    assert "not compiling: torch.compile needs Triton here; running eager" in out
    assert "settings: cuda | B 2 T 32 | autocast fp16 + grad scaler | compile off" in out


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
@pytest.mark.parametrize("name", FAST)
def test_compile_without_a_compiler_runs_eager_with_one_line(name, tmp_path, monkeypatch):
    """--compile on a CPU with no C++ compiler (a Windows PC without MSVC) trains eagerly and says so;
    torch.compile is never called, so inductor cannot fail later with a page of compiler errors."""
    m = load(name)
    monkeypatch.setattr(m.shutil, "which", lambda cmd: None)
    monkeypatch.setattr(m.torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    args = [a for a in CPU if a != "--no-compile"] + stage_args(name, tmp_path) + ["--compile", "--steps", "2"]
    out, rows = main_steps(m, args)
    assert "not compiling: torch.compile needs a C++ compiler here; running eager" in out and "compile off" in out
    assert len(rows) == 2
    monkeypatch.setattr(m.shutil, "which", lambda cmd: "/usr/bin/" + cmd)  # a compiler: compile, say nothing
    compiled = []
    monkeypatch.setattr(m.torch, "compile", lambda model: compiled.append(model) or model)
    out, rows = main_steps(m, args[:-2] + ["--steps", "1"] + (["--log-dir", tmp_path / "log2"] if name == NAME else []))
    assert "not compiling" not in out and "compile on" in out and len(compiled) == 1 and len(rows) == 1


@pytest.mark.parametrize("name", FAST)
def test_emulated_bf16_counts_as_not_native(name, monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a T4 (bf16 emulated, slowly); ask for the real thing."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not load(name).native_bf16("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert load(name).native_bf16("cuda")


OOM_PLACES = ([(n, where) for where in ("forward", "optimizer step") for n in existing(SCRIPTS[2:])]
              + [(n, "compiled step") for n in FAST] + [(NAME, "eval")])


@pytest.mark.parametrize("name, where", OOM_PLACES)
def test_out_of_memory_gives_one_line_with_the_batch_to_try(name, where, tmp_path, monkeypatch):
    """Out of memory anywhere in a training step (stages 2-7): in the forward pass, in AdamW's first step (which
    allocates its two moments), in a torch.compile'd model, or in stage 7's evaluation: one line, the -B to try."""
    m = load(name)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB")
    if where in ("forward", "eval"):
        original = m.GPT.forward

        def forward(self, idx, targets=None):  # out of memory in training (grad on) or in eval (off)
            if torch.is_grad_enabled() == (where == "forward"):
                raise oom
            return original(self, idx, targets)
        monkeypatch.setattr(m.GPT, "forward", forward)
    elif where == "optimizer step":
        monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: (_ for _ in ()).throw(oom))
    else:
        monkeypatch.setattr(m.shutil, "which", lambda cmd: "/usr/bin/" + cmd)

        class Compiled(torch.nn.Module):  # runs out of memory when called, as a compiled graph can
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, *a, **k):
                raise oom
        monkeypatch.setattr(m.torch, "compile", Compiled)
    accumulates = name in FAST and name != "5_train_speedup"  # stages 6-7 have --total-batch-size
    args = (CPU + stage_args(name, tmp_path) if name in FAST else TINY + ["--device", "cpu", "-T", "32"])
    args = [a for a in args if a != "--no-compile"] + (["--compile"] if where == "compiled step" else [])
    with pytest.raises(SystemExit) as e:
        main_steps(m, args + ["--steps", "1", "-B", "4"] + (["--total-batch-size", "256"] if accumulates else []))
    line = str(e.value.code)
    assert "\n" not in line and line.startswith("error: out of memory at -B 4 -T 32 on cpu; try -B 2"), line
    assert ("(same --total-batch-size: same run)" in line) == accumulates


# ---------------------------------------------------------------------------- several machines


def free_port():
    """A free TCP port below the kernel's ephemeral range: no socket the OS numbers itself (an outgoing
    connection, gloo's listeners, another test's bind to port 0) can take it between this check and the
    rendezvous's bind a few seconds later, as one could on a machine busy with other test runs."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):  # no /proc (macOS: 49152 and up)
        low = 32768
    rng = random.Random()  # not seeded: another test session on the machine draws other ports
    for _ in range(200):
        port = rng.randrange(max(1024, low - 10000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    pytest.fail(f"no free TCP port in {max(1024, low - 10000)}-{low - 1} on 127.0.0.1 after 200 tries")


NODES_TIMEOUT = 300  # s for the two nodes together; ~30 s alone on a busy 2-core machine


def two_nodes(cwds, *args, timeout=NODES_TIMEOUT, join_timeout=None):
    """Stage 7 on two torchrun "nodes" (one process each) meeting at a c10d rendezvous on
    loopback, each started in its own folder: [(returncode, stdout + stderr)] per node.
    Each node writes to a file, not a pipe: a pipe nobody reads while the other node runs fills up
    (64 KiB) and stops its writer mid-run, and the other rank then waits for it in a collective.
    The wait is bounded: after `timeout` s both process groups are killed and the test fails
    saying what it waited for, with what each node printed."""
    # a run id of its own: no other session's nodes can join this rendezvous
    port, run_id, procs, outs = free_port(), f"gpt2-test-{uuid.uuid4().hex[:12]}", [], []
    for cwd in cwds:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
               f"--rdzv-conf=join_timeout={join_timeout or timeout // 2}",  # a node that never comes: said
               "--max-restarts=0", str(ROOT / f"{NAME}.py"), *RUN, *[str(a) for a in args]]
        outs.append(tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=outs[-1], stderr=subprocess.STDOUT, text=True,
                                      env=child_env(), start_new_session=True))
    deadline, late = time.monotonic() + timeout, []
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            late.append(p)
    for p in late:  # torchrun and its worker: the whole process group, politely first
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in late:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    texts = []
    for f in outs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    if late:
        said = "".join(f"\n--- node {i} ({cwd}), {'still running' if p in late else f'exit {p.returncode}'}:\n"
                       f"{text[-3000:]}" for i, (cwd, p, text) in enumerate(zip(cwds, procs, texts)))
        pytest.fail(f"two torchrun nodes (rendezvous 127.0.0.1:{port}, id {run_id}) were waited for {timeout} s "
                    f"to finish and {len(late)} had not; killed. What they printed:{said}")
    return [(p.returncode, text) for p, text in zip(procs, texts)]


@pytest.mark.slow
def test_a_node_that_never_finishes_is_killed_and_named(tmp_path):
    """two_nodes cannot hang: one "node" alone waits for its partner (its own join timeout far off); after
    the test's timeout its process group is killed and the failure says what was waited for."""
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as e:
        two_nodes([tmp_path], "--steps", "1", timeout=8, join_timeout=600)
    message = str(e.value)
    assert "were waited for 8 s to finish and 1 had not; killed" in message and "node 0" in message
    assert "still running" in message and time.monotonic() - t0 < 8 + 15 + 10  # SIGTERM, maybe SIGKILL


@pytest.mark.slow
def test_two_nodes_train_exactly_as_one_process(tmp_path):
    shards = write_shards(tmp_path / "shards", [3001, 5003, 4099])
    empty = tmp_path / "no_hellaswag.jsonl"
    empty.write_text("")
    common = ["--data-dir", shards, "--hellaswag-file", empty, "--steps", "3"]
    _, one = run7(*common, "--log-dir", tmp_path / "one")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (rc0, out0), (rc1, out1) = two_nodes([tmp_path / "a", tmp_path / "b"], *common, "--log-dir", tmp_path / "two")
    assert rc0 == rc1 == 0, out0 + out1
    out = out0 if "step     0 |" in out0 else out1  # whichever node got global rank 0 prints
    assert "DDP: 2 ranks, gloo" in out and "on each of 2 ranks" in out
    two = parse_steps(out)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)


@pytest.mark.slow
def test_resume_where_a_node_cannot_see_the_checkpoint(tmp_path):
    """--log-dir log, relative: each node resolves it in its own folder, as two machines without
    shared storage would; one of them holds the checkpoint. Each rank says so in one line."""
    shards = write_shards(tmp_path / "shards", [3001, 5003, 4099])
    empty = tmp_path / "no_hellaswag.jsonl"
    empty.write_text("")
    for node in "ab":
        (tmp_path / node / "log").mkdir(parents=True)
    run7("--data-dir", shards, "--hellaswag-file", empty, "--steps", "1", "--log-dir", tmp_path / "a" / "log")
    results = two_nodes([tmp_path / "a", tmp_path / "b"], "--data-dir", shards, "--hellaswag-file", empty,
                        "--steps", "2", "--log-dir", "log", "--resume")
    for rc, out in results:
        assert rc != 0
        assert "put --log-dir on storage every node shares" in out and f'{NAME}.py", line' not in out  # no traceback
    both = results[0][1] + results[1][1]  # which node got rank 0 is the rendezvous's choice
    assert "rank by rank: model_00001.pt, none;" in both or "rank by rank: none, model_00001.pt;" in both
