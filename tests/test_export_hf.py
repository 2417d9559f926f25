"""export_hf.py: a stage-7 checkpoint -> GPT2LMHeadModel + tokenizer, equal to our GPT, offline."""
import os

import pytest
import torch
from conftest import ROOT, STAGE7, assert_clean_error, load, main_error, run_here

import export_hf

PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model," (the lecture's)


def hf_model(folder):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def test_export_logits_equal_ours(checkpoint, exported):
    hf = hf_model(exported)
    c = hf.config
    assert (c.vocab_size, c.n_positions, c.n_layer, c.n_head, c.n_embd) == (50257, 1024, 2, 2, 32)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in GPT-2
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = checkpoint[1](idx)[0][..., :50257]
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape == (3, 40, 50257)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert os.listdir(exported.parent) == [exported.name]  # no temporary folder left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(os.stat(exported / name).st_mode & 0o777) for name in os.listdir(exported)} == {oct(0o666 & ~umask)}
    assert oct(os.stat(exported).st_mode & 0o777) == oct(0o777 & ~umask)  # not mkdtemp's private 0700


def test_tokenizer_is_gpt2s(exported, enc):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok("Hello, I'm a language model,")["input_ids"] == PROMPT_IDS
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    for text in ["  two  spaces\n\nand\ttabs", "naïve café — 東京 🤖 ’quotes’", "x" * 40 + " 12345 don't",
                 (ROOT / "input.txt").read_text(encoding="utf-8")[:3000]]:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode(text) and tok.decode(ids) == text


def test_greedy_generation_equals_ours(checkpoint, exported, enc):
    """transformers' greedy decoding (generate, and the text-generation pipeline) equals stage
    7's own sampling loop with top-k 1, which never picks a padding id."""
    from transformers import pipeline
    stage7, model = load(STAGE7), checkpoint[1]
    prompt = torch.tensor([PROMPT_IDS])
    ours = stage7.generate(model, prompt, max_length=len(PROMPT_IDS) + 12, top_k=1)
    with torch.no_grad():
        theirs = hf_model(exported).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                             do_sample=False)
    assert theirs.tolist() == ours.tolist()
    with torch.no_grad():  # the checkpoint's raw argmax would be a padding id: the export has none
        assert model(prompt)[0][0, -1].argmax().item() >= 50257
    generator = pipeline("text-generation", model=str(exported), device="cpu")
    text = generator("Hello, I'm a language model,", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == enc.decode(ours[0].tolist())


def test_stage1_samples_from_the_export(exported, capsys):
    """`python 1_gpt2_hf_eval.py --model OUT_DIR` (its main, in this process): 5 samples, and its
    GPT built from the folder computes what GPT2LMHeadModel does."""
    load("1_gpt2_hf_eval").main(["--model", str(exported), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("> Hello, I'm a language model,") == 5
    check = [line for line in out.splitlines() if line.startswith(f"loaded {exported}: max |logits")]
    assert len(check) == 1 and float(check[0].rsplit(" ", 1)[1]) < 1e-5, out


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_a_real_runs_checkpoint_into_an_empty_folder(stage7_run, tmp_path):
    """The checkpoint a real (tiny) stage-7 run wrote; an existing empty OUT_DIR is fine."""
    out = tmp_path / "out"
    out.mkdir()
    diff, ids = export_hf.export(stage7_run / "model_00004.pt", out)
    assert ids == PROMPT_IDS and diff <= 1e-4
    ours = export_hf.gpt_from_checkpoint(stage7_run / "model_00004.pt")
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf_model(out)(idx).logits - ours(idx)[0][..., :50257]).abs().max().item() <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("kind", ["missing", "text-file", "other-torch-file", "out-dir-not-empty"])
def test_bad_input_is_one_line_and_writes_nothing(kind, checkpoint, tmp_path):
    path, out = tmp_path / "model_00004.pt", tmp_path / "out"
    if kind == "text-file":
        path.write_text("step 0 train 10.9\n")
    elif kind == "other-torch-file":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "out-dir-not-empty":
        path = checkpoint[0]
    if kind == "out-dir-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    proc = run_here("export_hf", path, out)
    assert_clean_error(proc, "out" if kind == "out-dir-not-empty" else "model_00004.pt")
    assert sorted(os.listdir(tmp_path)) == before  # no OUT_DIR, no temporary folder
    if kind == "out-dir-not-empty":
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_out_dir_is_or_holds_the_checkpoint(checkpoint, tmp_path):
    """OUT_DIR is the checkpoint file itself, or the log dir that holds it: one line before any work, the
    checkpoint untouched."""
    log = tmp_path / "log"
    log.mkdir()
    path = log / "model_00004.pt"
    path.write_bytes(checkpoint[0].read_bytes())
    for out in (path, log):
        message = main_error(export_hf, [path, out])
        assert f"{out} exists and is not an empty folder" in message
    assert os.listdir(tmp_path) == ["log"] and os.listdir(log) == ["model_00004.pt"]
    assert path.read_bytes() == checkpoint[0].read_bytes()


def test_legacy_format_checkpoint_loads(checkpoint, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) writes torch's legacy (non-zip) format, which
    stage 7's --resume reads; export_hf.py and `hellaswag.py -m` (gpt_from_checkpoint) read it too, although
    it cannot be memory-mapped."""
    import hellaswag
    legacy = tmp_path / "model_00004.pt"
    torch.save(torch.load(checkpoint[0], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = checkpoint[1](idx)[0]
        assert torch.equal(export_hf.gpt_from_checkpoint(legacy)(idx)[0], want)
        model_fn, block_size = hellaswag.load_model(str(legacy), "cpu")
        assert torch.equal(model_fn(idx), want[..., :50257]) and block_size == 1024


def test_failure_midway_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def disk_full(folder, model):
        assert sorted(os.listdir(folder))[:2] == ["config.json", "generation_config.json"]  # half-written
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export_hf, "check_export", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_hf.export(checkpoint[0], tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fails, out_exists", [("config.json", False), ("model.safetensors", False),
                                               ("tokenizer.json", True)])
def test_full_disk_is_one_line_and_leaves_nothing(fails, out_exists, checkpoint, tmp_path, monkeypatch):
    """ENOSPC while writing into the temporary folder: one line naming what could not be written and
    why; no temporary folder left, OUT_DIR not created (or, already there and empty, left so). The
    writes of config.json and tokenizer.json really hit a full disk (symlinks to /dev/full: an
    OSError, and tokenizers' bare Exception); safetensors writes around a symlink, so its full disk
    is its own SafetensorError with the message a full 1 MB tmpfs gave."""
    import errno
    import tempfile

    from safetensors import SafetensorError
    if fails != "model.safetensors" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "gpt2-ours"
    if out_exists:
        out.mkdir()
    mkdtemp = tempfile.mkdtemp

    def mkdtemp_on_a_full_disk(*args, **kwargs):
        folder = mkdtemp(*args, **kwargs)
        if fails != "model.safetensors":
            os.symlink("/dev/full", os.path.join(folder, fails))
        return folder

    def serialize_file(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error 28)")
    monkeypatch.setattr(export_hf.tempfile, "mkdtemp", mkdtemp_on_a_full_disk)
    if fails == "model.safetensors":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([str(checkpoint[0]), str(out)])
    message = str(exit_info.value.code)
    what = "the tokenizer" if fails == "tokenizer.json" else "the model"
    assert message.startswith(f"error: could not write {what} (") and fails in message.split(" into ")[0]
    assert "No space left on device" in message and f"{out} is not written: free about 10 MB" in message
    assert len(message.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before                        # no temporary folder
    assert not out_exists or os.listdir(out) == []
