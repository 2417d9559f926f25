"""export_hf.py: a checkpoint of stage 7 -> a Hugging Face GPT2LMHeadModel folder, tokenizer
included.

What the run trained is then readable by the rest of the ecosystem (transformers, its
pipelines, lm-evaluation-harness, ...), offline:
- config.json + model.safetensors: GPT2LMHeadModel with the checkpoint's sizes and vocab 50,257
  (the 47 rows stage 5 padded the vocab with are dropped: no token ever maps to them), the four
  matmul weights per block in OpenAI's Conv1D layout (the transpose of nn.Linear's), lm_head
  tied to wte as in GPT-2
- GPT-2's tokenizer, written from tiktoken's two cached files (they are GPT-2's encoder.json and
  vocab.bpe), so AutoTokenizer and pipeline("text-generation", model=OUT_DIR) need no hub
The folder is written beside OUT_DIR under a temporary name, checked (its logits against the
checkpoint's, its token ids against tiktoken's), then renamed: a failure leaves nothing behind.

    python export_hf.py log/model_19073.pt gpt2-ours
    python 1_gpt2_hf_eval.py --model gpt2-ours     # samples from it, checks its logits
    python hellaswag.py -m gpt2-ours               # same score as -m log/model_19073.pt
"""
import argparse
import errno
import importlib
import json
import os
import shutil
import sys
import tempfile
import zipfile

import tiktoken
import torch

STAGE7 = "7_train_ddp_fineweb"  # the script whose checkpoints (model_{n:05d}.pt) this reads
STAGE8 = "8_train_modern"  # its checkpoints' config has a logit_softcap; hellaswag.py -m reads them
VOCAB_SIZE = 50257  # GPT-2's real tokens; a checkpoint's vocab is padded to 50304
# OpenAI's checkpoints use a Conv1D module whose weight is the transpose of nn.Linear's
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the two files tiktoken's "gpt2" encoding is made of (tiktoken_ext/openai_public.py), with their
# sha256; tiktoken caches each under the sha1 of its URL, in TIKTOKEN_CACHE_DIR if set
BPE_FILES = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
PROMPT = "Hello, I'm a language model,"


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of stage 7; the message says which and why."""


class ExportError(RuntimeError):
    """The export could not be written; the message says why, in one line."""


def read_checkpoint(path):
    """The dict stage 7 saved: model (state dict), optimizer, config (GPTConfig's fields),
    step, ..."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:  # weights_only: plain types and tensors, so loading runs no pickled code; mmap: the
        # optimizer's state (twice the model's size) is never read from disk. torch's legacy format
        # (_use_new_zipfile_serialization=False, which stage 7 resumes from too) is not a zip and
        # cannot be mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (not a torch file), RuntimeError (truncated), ...
        raise CheckpointError(f"{path} is not a checkpoint torch.load can read "
                              f"({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("config"), dict)):
        raise CheckpointError(f"{path} is not a checkpoint of {STAGE7}.py "
                              "(no 'model' and 'config' in it)")
    return ckpt


def gpt_from_checkpoint(path):
    """Stage 7's GPT (stage 8's for its checkpoints), built from the checkpoint's config, with its
    weights, in eval mode."""
    ckpt = read_checkpoint(path)
    # its name starts with a digit: no plain import
    stage7 = importlib.import_module(STAGE8 if "logit_softcap" in ckpt["config"] else STAGE7)
    try:
        model = stage7.GPT(stage7.GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:  # unknown config fields; missing or mis-shaped weights
        raise CheckpointError(f"{path}: its weights do not fit its config {ckpt['config']} "
                              f"({str(e).splitlines()[0][:100]})") from None
    if model.config.vocab_size < VOCAB_SIZE:
        raise CheckpointError(f"{path}: vocab {model.config.vocab_size} < GPT-2's {VOCAB_SIZE}")
    return model.eval()


def to_hf(model):
    """GPT2LMHeadModel with our GPT's weights: padding rows dropped, Conv1D layout, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    # GPT2Config's defaults are GPT-2's: tanh GELU ("gelu_new"), LayerNorm eps 1e-5, tied lm_head;
    # dropout 0, as our GPT was trained (it only matters to whoever fine-tunes the export)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=c.block_size,
                                    n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    sd = {}
    for k, w in model.state_dict().items():
        w = w.t() if k.endswith(TRANSPOSED) else w
        sd[k] = w[:VOCAB_SIZE] if k in ("transformer.wte.weight", "lm_head.weight") else w
    hf.load_state_dict(sd)  # strict: every key of GPT-2's, each shape checked
    hf.generation_config.pad_token_id = 50256  # <|endoftext|>: batched generation needs a pad id
    return hf.eval()


def gpt2_tokenizer_from_tiktoken():
    """GPT-2's tokenizer (transformers) from the two files tiktoken caches, without the hub."""
    from tiktoken.load import read_file_cached
    from transformers import GPT2Tokenizer
    try:
        encoder, bpe = [read_file_cached(url, sha256) for url, sha256 in BPE_FILES.values()]
    except (OSError, ValueError) as e:  # offline with nothing cached; a corrupt download
        raise ExportError(f"could not get GPT-2's BPE files ({type(e).__name__}); offline, set "
                          "TIKTOKEN_CACHE_DIR to a folder that holds them") from None
    vocab = json.loads(encoder)  # {"!": 0, ..., "<|endoftext|>": 50256}, byte-level unicode strings
    # vocab.bpe: a "#version" line, then one merge per line, "Ġ t", in priority order
    merges = [tuple(line.split(" ")) for line in bpe.decode("utf-8").split("\n")[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)


def export(checkpoint, out_dir):
    """Write the export of `checkpoint` to out_dir (which must not exist, or be empty)."""
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise ExportError(f"{out_dir} exists and is not an empty folder; choose another OUT_DIR")
    model = gpt_from_checkpoint(checkpoint)
    if hasattr(model.config, "logit_softcap"):
        raise ExportError(f"{checkpoint} is a checkpoint of {STAGE8}.py: rotary, RMSNorm, ReLU^2 "
                          "and a logit softcap are not GPT-2's architecture, so no GPT2LMHeadModel "
                          "holds it (hellaswag.py -m scores it as it is)")
    tokenizer = gpt2_tokenizer_from_tiktoken()
    hf = to_hf(model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        for what, obj in (("the model (config.json, generation_config.json, "
                           "model.safetensors)", hf),
                          ("the tokenizer (tokenizer.json, tokenizer_config.json)", tokenizer)):
            try:
                obj.save_pretrained(tmp)
            # a full disk raises an OSError (config.json), safetensors' SafetensorError ("I/O error:
            # No space left on device (os error 28)") or tokenizers' bare Exception (tokenizer.json)
            except Exception as e:
                raise ExportError(write_failed(what, tmp, out_dir, e, hf)) from None
        # mkdtemp's folder is private (0700), and so is the model.safetensors transformers 5
        # writes (0600); the export is for sharing: the usual permissions, as the umask has them
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        diff, ids = check_export(tmp, model)
        if diff > 1e-4:
            raise ExportError(f"the export's logits differ from the checkpoint's by {diff:.2e}")
        if ids != tiktoken.get_encoding("gpt2").encode(PROMPT):
            raise ExportError(f"the exported tokenizer's ids of {PROMPT!r}, {ids}, "
                              "are not tiktoken's")
        emptied = os.path.isdir(out_dir)
        if emptied:
            os.rmdir(out_dir)  # empty (checked above): the rename puts the finished folder there
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if emptied:
                os.mkdir(out_dir)  # OUT_DIR as it was
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return diff, ids


def write_failed(what, tmp, out_dir, e, hf):
    """The one line for a failed write into the temporary folder (which export then removes)."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in reason
    # float32 weights (wte and lm_head tied: stored once) + GPT-2's tokenizer.json (3.4 MB)
    size_mb = sum(p.numel() for p in hf.parameters()) * 4 / 1e6 + 3.4
    fix = (f"free about {size_mb:,.0f} MB on that disk, or choose an OUT_DIR on another one" if full
           else "check that disk and its permissions")
    return (f"could not write {what} into {tmp} ({reason}); that temporary folder is removed and "
            f"{out_dir} is not written: {fix}")


@torch.no_grad()
def check_export(folder, model):
    """Load the folder the way users will; max |logit difference| to our GPT on the prompt, and
    the prompt's ids through the saved tokenizer (equal to tiktoken's)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]
    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.tensor([ids])
    diff = (hf(idx).logits - model(idx)[0][..., :VOCAB_SIZE]).abs().max().item()
    return diff, ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("checkpoint",
                        help="a checkpoint of 7_train_ddp_fineweb.py, e.g. log/model_19073.pt")
    parser.add_argument("out_dir", help="the folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        diff, ids = export(args.checkpoint, args.out_dir)
    except (CheckpointError, ExportError, OSError) as e:
        sys.exit(f"error: {e}")
    names = sorted(os.listdir(args.out_dir))
    print(f"wrote {args.out_dir}: {', '.join(names)}")
    print(f"checked: max |logits - checkpoint's logits| on the prompt {diff:.2e}; "
          f"tokenizer ids of {PROMPT!r}: {ids}")
    print(f"sample from it: python 1_gpt2_hf_eval.py --model {args.out_dir}")


if __name__ == "__main__":
    main()
