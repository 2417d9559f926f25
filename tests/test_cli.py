"""Every script runs end to end as a program; bad input gets one clear line, no traceback.
main(argv) runs in this process (run_here); only what needs a fresh interpreter starts one."""
import pytest
import sys

from conftest import (ROOT, SCRIPTS, TINY, assert_clean_error, existing, load, load_fresh, main_error,
                      make_examples, parse_steps, run_here, run_script, write_jsonl)

TRAIN = existing(SCRIPTS[2:7])  # the tiny-Shakespeare training scripts


def test_stage0_runs():
    proc = run_here("0_gpt2_model", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 3,274,688" in proc.stdout  # wte + lm_head 2 x 50257 x 32, wpe 1024 x 32, 2 x 12,704 per block, ln_f 64
    assert "input (5, 8) -> logits (5, 8, 50257)" in proc.stdout
    assert proc.stdout.count("> Hello, I'm a language model,") == 5


def test_stage1_runs_on_local_dir(hf_dir):
    proc = run_here("1_gpt2_hf_eval", "--model", hf_dir, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> Hello, I'm a language model,") == 5
    check = [line for line in proc.stdout.splitlines() if line.startswith(f"loaded {hf_dir}: max |logits")]
    assert len(check) == 1 and float(check[0].rsplit(" ", 1)[1]) < 1e-5, proc.stdout


@pytest.mark.parametrize("name", TRAIN)
def test_training_script_runs(name):
    proc = run_here(name, *TINY, "--steps", "3", "-B", "2", "-T", "16", "--device", "cpu",
                    "--num-return-sequences", "2", "--max-length", "11")
    assert proc.returncode == 0, proc.stderr
    rows = parse_steps(proc.stdout)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(9 < r["loss"] < 12 for r in rows)
    samples = [line for line in proc.stdout.splitlines() if line.startswith("> Hello, I'm a language model,")]
    assert len(samples) == 2  # after training, as stage 1 samples from OpenAI's weights (5 by default)


def test_hub_name_offline_is_one_line():
    proc = run_here("1_gpt2_hf_eval", "--model", "gpt2")  # HF_HUB_OFFLINE=1 (conftest)
    assert_clean_error(proc, "gpt2", "local save_pretrained directory")


# a value out of range for each flag that has a range; each is refused at parse_args, before any work
BAD_FLAGS = [("--n-layer", "-1"), ("--n-layer", "0"), ("--n-head", "0"), ("--n-embd", "0"), ("--seed", "-1"),
             ("--num-return-sequences", "0"), ("--num-return-sequences", "-1"), ("--max-length", "8"),
             ("--max-length", "1025"), ("-B", "0"), ("-T", "0"), ("-T", "2048"), ("--steps", "0"), ("--steps", "-3"),
             ("--steps", "2.5"), ("--peak-tflops", "-1"), ("--total-batch-size", "0"), ("--max-lr", "-0.1"),
             ("--max-lr", "nan"), ("--warmup-steps", "-1"), ("--eval-every", "0"), ("--hellaswag-limit", "-1"),
             ("--checkpoint-every", "0")]
# otherwise a quick run, so that a missing check shows as a run that goes on, not a long wait
QUICK = {"--n-layer": "2", "--n-head": "2", "--n-embd": "32", "--device": "cpu", "--steps": "1", "-B": "1", "-T": "8",
         "--num-return-sequences": "1", "--max-length": "9", "--total-batch-size": "8", "--eval-every": "1000"}


@pytest.mark.parametrize("name", existing(SCRIPTS))
def test_flag_out_of_range_is_one_line_before_any_work(name, tmp_path):
    module = load(name)
    flags = module.make_parser()._option_string_actions
    quick = [a for flag, value in QUICK.items() if flag in flags for a in (flag, value)]
    if "--log-dir" in flags:  # stage 7: nothing written, not even the log dir
        quick += ["--log-dir", tmp_path / "log", "--data-dir", tmp_path / "shards"]
    checked = 0
    for flag, value in BAD_FLAGS:
        if flag in flags:
            message = main_error(module, quick + [flag, value])
            assert message.startswith(f"error: argument {flag}") and f"got {value}; pass " in message, message
            checked += 1
    assert checked >= 3 and not any(tmp_path.iterdir())
    if "--n-layer" in flags:  # the heads split n_embd evenly
        message = main_error(module, quick + ["--n-embd", "30", "--n-head", "4"])
        assert "--n-embd 30 is not a multiple of --n-head 4" in message


@pytest.mark.parametrize("name", TRAIN)
def test_input_file_unreadable_not_utf8_or_short(name, tmp_path):
    """--input that is missing, a folder, Latin-1 or empty: one line naming the file."""
    latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    empty.write_text("")
    for path, needle in ((tmp_path / "nope.txt", "No such file"), (tmp_path, "Is a directory"),
                         (latin1, "not UTF-8 text"), (empty, "has 0 tokens")):
        message = main_error(name, TINY + ["--device", "cpu", "--input", path])
        assert f"{path}" in message and needle in message, message


@pytest.mark.slow
def test_samples_print_on_any_locale():
    """LC_ALL=C without UTF-8 mode: stdout is ascii. A sample with characters beyond it prints them
    escaped (caf\\xe9) instead of ending the run with a UnicodeEncodeError. Every numbered script sets
    this up the same way; stage 0 is run, with tiktoken's decode forced to return non-ASCII text."""
    code = ("import runpy, sys, tiktoken; tiktoken.Encoding.decode = lambda self, ids, **k: 'caf\\u00e9 \\u2713'; "
            f"sys.argv = ['0_gpt2_model.py', *{TINY!r}, '--num-return-sequences', '1', '--max-length', '9']; "
            "runpy.run_path('0_gpt2_model.py', run_name='__main__')")
    proc = run_script("0_gpt2_model", cmd=["env", "-u", "PYTHONIOENCODING", sys.executable, "-c", code],
                      env={"LC_ALL": "C", "PYTHONUTF8": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "> caf\\xe9 \\u2713" in proc.stdout, proc.stdout
    line = 'sys.stdout.reconfigure(errors="backslashreplace")'
    assert all(line in (ROOT / f"{name}.py").read_text(encoding="utf-8") for name in existing(SCRIPTS))


@pytest.mark.parametrize("name", existing(SCRIPTS[1:]))
def test_unknown_device(name):
    proc = run_here(name, "--device", "tpu")
    assert_clean_error(proc, "--device", "tpu")


@pytest.mark.parametrize("name", existing(SCRIPTS))
def test_import_has_no_side_effects(name, capfd):
    """Importing a stage defines things and runs nothing (docs/contributing.md: importing a script runs
    nothing): no output, no process group, no training. A fresh copy is imported, so its top level runs now."""
    import torch.distributed as dist
    load_fresh(name)
    out, err = capfd.readouterr()
    assert out == err == "" and not dist.is_initialized()


@pytest.mark.parametrize("name", existing(SCRIPTS[:7]) + ["hellaswag"])
def test_missing_bpe_files_offline(name, tmp_path, hf_dir, monkeypatch):
    """No GPT-2 BPE files in the tiktoken cache and no network: one line that names the fix.
    A dead proxy makes the download fail even on a machine that is online. tiktoken keeps what it loaded
    (its registry), and so may a script: both start empty here."""
    import tiktoken.registry
    args = {"0_gpt2_model": TINY, "1_gpt2_hf_eval": ["--model", hf_dir],
            "hellaswag": ["-m", hf_dir, "--data-file", write_jsonl(tmp_path / "h.jsonl", make_examples(2))]
            }.get(name, TINY + ["--steps", "1", "-B", "1", "-T", "8", "--device", "cpu"])
    empty = tmp_path / "no_bpe"
    empty.mkdir()
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers
    for var, value in {"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": dead, "https_proxy": dead}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    assert_clean_error(run_here(load_fresh(name), *args), "TIKTOKEN_CACHE_DIR")
