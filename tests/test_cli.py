"""Every script runs end to end as a program; bad input gets one clear line, no traceback."""
import pytest
from conftest import SCRIPTS, TINY, assert_clean_error, existing, make_examples, parse_steps, run_script, write_jsonl

TRAIN = existing(SCRIPTS[2:7])  # the tiny-Shakespeare training scripts


def test_stage0_runs():
    proc = run_script("0_gpt2_model", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 3,274,688" in proc.stdout  # wte + lm_head 2 x 50257 x 32, wpe 1024 x 32, 2 x 12,704 per block, ln_f 64
    assert "input (5, 8) -> logits (5, 8, 50257)" in proc.stdout
    assert proc.stdout.count("> Hello, I'm a language model,") == 5


def test_stage1_runs_on_local_dir(hf_dir):
    proc = run_script("1_gpt2_hf_eval", "--model", hf_dir, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> Hello, I'm a language model,") == 5
    check = [line for line in proc.stdout.splitlines() if line.startswith(f"loaded {hf_dir}: max |logits")]
    assert len(check) == 1 and float(check[0].rsplit(" ", 1)[1]) < 1e-5, proc.stdout


@pytest.mark.parametrize("name", TRAIN)
def test_training_script_runs(name):
    proc = run_script(name, *TINY, "--steps", "3", "-B", "2", "-T", "16", "--device", "cpu",
                      "--num-return-sequences", "2", "--max-length", "11")
    assert proc.returncode == 0, proc.stderr
    rows = parse_steps(proc.stdout)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(9 < r["loss"] < 12 for r in rows)
    samples = [line for line in proc.stdout.splitlines() if line.startswith("> Hello, I'm a language model,")]
    assert len(samples) == 2  # after training, as stage 1 samples from OpenAI's weights (5 by default)


def test_hub_name_offline_is_one_line():
    proc = run_script("1_gpt2_hf_eval", "--model", "gpt2", env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(proc, "gpt2", "local save_pretrained directory")


@pytest.mark.parametrize("name", TRAIN)
def test_missing_input(name, tmp_path):
    proc = run_script(name, *TINY, "--input", tmp_path / "nope.txt")
    assert_clean_error(proc, "nope.txt", "not found")


@pytest.mark.parametrize("name", existing(SCRIPTS[2:]))
def test_seq_len_beyond_block_size(name):
    proc = run_script(name, *TINY, "-T", "2048", "--device", "cpu")
    assert_clean_error(proc, "block size 1024")


@pytest.mark.parametrize("name", existing(SCRIPTS[1:]))
def test_unknown_device(name):
    proc = run_script(name, "--device", "tpu")
    assert_clean_error(proc, "--device", "tpu")


@pytest.mark.parametrize("name", existing(SCRIPTS))
def test_import_has_no_side_effects(name):
    """Importing a stage defines things and runs nothing (DESIGN.md, contract 1)."""
    code = f"import importlib; importlib.import_module('{name}')"
    proc = run_script(name, cmd=["python", "-c", code])
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("name", existing(SCRIPTS[:7]) + ["hellaswag"])
def test_missing_bpe_files_offline(name, tmp_path, hf_dir):
    """No GPT-2 BPE files in the tiktoken cache and no network: one line that names the fix.
    A dead proxy makes the download fail even on a machine that is online."""
    args = {"0_gpt2_model": TINY, "1_gpt2_hf_eval": ["--model", hf_dir],
            "hellaswag": ["-m", hf_dir, "--data-file", write_jsonl(tmp_path / "h.jsonl", make_examples(2))]
            }.get(name, TINY + ["--steps", "1", "-B", "1", "-T", "8", "--device", "cpu"])
    empty = tmp_path / "no_bpe"
    empty.mkdir()
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers
    proc = run_script(name, *args, env={"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": dead, "https_proxy": dead})
    assert_clean_error(proc, "TIKTOKEN_CACHE_DIR")
