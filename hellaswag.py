"""HellaSwag: evaluate a model on it in completion style.

Each example is a context and 4 candidate endings (Zellers et al. 2019, "HellaSwag: Can a Machine
Really Finish Your Sentence?"). GPT-2 cannot see all four at once the way a multiple-choice
prompt would, so we score completions: the model reads context + ending for each of the 4
endings, and the ending whose tokens get the lowest cross-entropy wins. `acc` takes the lowest
summed loss, `acc_norm` the lowest average (per-token) loss, which does not penalise long
endings for being long.

The data comes from the Hugging Face hub dataset Rowan/hellaswag (read with `datasets`, cached
after the first time; our split "val" is its "validation", 10,042 examples). The lecture
downloaded jsonl files from the GitHub repo rowanz/hellaswag, which was taken down on 2026-09-14;
--data-file reads such a jsonl, or the hub's format as .jsonl or .parquet, from disk.

    python hellaswag.py -m gpt2 -d cuda            # HF hub name or a save_pretrained directory
    python hellaswag.py -m log/model_19073.pt      # a checkpoint 7_train_ddp_fineweb.py wrote
    python hellaswag.py -m gpt2 --data-file hellaswag_val.jsonl --limit 500

Expected figures (the lecture's, from its hellaswag.py; not measured here, this workplace is
offline), on all 10,042 validation examples:
    gpt2 (124M):   acc 0.2859  acc_norm 0.2955
    gpt2-xl (1558M):           acc_norm 0.4893
7_train_ddp_fineweb.py imports HellaSwagError, iterate_examples and evaluate from here, so
importing this file downloads nothing, loads no tokenizer and does not import `datasets`.
"""
import argparse
import functools
import itertools
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import tiktoken
import torch
from torch.nn import functional as F

HUB_PATH = "Rowan/hellaswag"  # the hub copy of rowanz/hellaswag's data; `label` is a string there
HUB_SPLITS = {"train": "train", "val": "validation"}  # ours -> the hub's (test has no labels)


class HellaSwagError(RuntimeError):
    """The data could not be read; the message says which data and why, in one line."""


@functools.lru_cache(maxsize=None)
def gpt2_encoder():
    try:
        return tiktoken.get_encoding("gpt2")  # loaded on first use, not at import
    except OSError as e:  # offline with nothing cached (requests' ConnectionError is an OSError)
        raise HellaSwagError(f"could not get GPT-2's BPE files ({type(e).__name__}); offline, set "
                             "TIKTOKEN_CACHE_DIR to a folder that holds them") from e


# ----------------------------------------------------------------------------- data

def hub_reachable(timeout=3.0):
    """Whether the hub (HF_ENDPOINT's host) takes a connection at all, found in at most
    `timeout` s. Behind a proxy there is no direct route to try: then it is taken to be
    reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:  # no route, no DNS, refused, timed out
        return False


def hub_rows(split, cache_dir=None):
    """The rows of one split of the hub dataset (downloaded once, then read from the cache).
    Offline, the hub clients would retry for ~25 s before reading their cache: where the hub cannot
    be reached they are told so first (HF_HUB_OFFLINE=1), and the cache answers at once."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when imported
        for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                             ("datasets.config", "HF_HUB_OFFLINE")):
            if module in sys.modules and hasattr(sys.modules[module], name):  # imported already
                setattr(sys.modules[module], name, True)
    try:
        from datasets import load_dataset  # heavy, and absent on some GPU images: only here
    except ImportError:
        raise HellaSwagError(f"reading the hub dataset {HUB_PATH} needs "
                             "`pip install datasets`") from None
    try:
        return load_dataset(HUB_PATH, split=HUB_SPLITS[split], cache_dir=cache_dir)
    except OSError as e:  # ConnectionError offline with nothing cached, DatasetNotFoundError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HellaSwagError(f"could not load the hub dataset {HUB_PATH} ({reason})") from None


def file_rows(path):
    """The rows of a local file: jsonl (the original format, or the hub's) or the hub's parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # comes with `datasets`
        except ImportError:
            raise HellaSwagError(f"reading {path} needs `pip install pyarrow`") from None
        try:
            rows = pq.read_table(path).to_pylist()  # 10,042 rows: a few MB
        except ValueError as e:  # pyarrow's ArrowInvalid: not a parquet file
            raise HellaSwagError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
        yield from rows
        return
    expected = "(jsonl expected, or a .parquet file)"
    with open(path, encoding="utf-8") as f:
        try:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise HellaSwagError(f"{path}, line {i}: not a JSON record "
                                             f"{expected}") from None
                    yield row
        except UnicodeDecodeError:
            raise HellaSwagError(f"{path}: not UTF-8 text {expected}") from None


LABELS = {0, 1, 2, 3, "0", "1", "2", "3"}  # the original's ints, the hub's strings


def example_problem(row):
    """What keeps `row` from being a HellaSwag example, in a few words; None if it is one. Only type
    and membership checks: 10,042 rows take milliseconds."""
    def what(x):
        name = type(x).__name__
        return "null" if x is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if not isinstance(row, dict):
        return f"it is {what(row)}, not a dict"
    missing = [key for key in ("ctx", "endings", "label") if key not in row]
    if missing:
        return f"it has no {' or '.join(missing)}"
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    # an empty context leaves an ending's first token unscored
    if not isinstance(ctx, str) or not ctx:
        return (f"its ctx is {what(ctx) if not isinstance(ctx, str) else 'empty'}, "
                "not a non-empty string")
    if not isinstance(endings, (list, tuple)) or len(endings) != 4:
        count = f" of {len(endings)}" if isinstance(endings, (list, tuple)) else ""
        return f"its endings are {what(endings)}{count}, not a list of 4 strings"
    for j, ending in enumerate(endings):
        if not isinstance(ending, str):
            return f"its ending {j} is {what(ending)}, not a string"
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label not in LABELS:
        return f"its label is {label!r:.20}, not 0-3 or \"0\"-\"3\""  # the test split's is ""
    return None


def iterate_examples(split="val", data_file=None, cache_dir=None):
    """Yield the examples (dicts with ctx, endings, label, ...) of a local file or of a split of
    the hub dataset, label as an int whichever format it came in. A row that is not an example
    (a field missing, an ending that is not a string, a label not 0-3) raises HellaSwagError
    naming the source and the example, so stage 7 can say it once and train without HellaSwag."""
    rows, i = file_rows(data_file) if data_file else hub_rows(split, cache_dir), -1
    for i, row in enumerate(rows):
        problem = example_problem(row)
        if problem:
            ind = f" (ind {row['ind']!r:.20})" if isinstance(row, dict) and "ind" in row else ""
            where, fix = ((data_file, "fix or remove that row") if data_file else
                          (f"the hub dataset {HUB_PATH} ({HUB_SPLITS[split]})",
                           "delete its copy in the `datasets` cache to download it again"))
            raise HellaSwagError(f"{where}: example {i}{ind} is not a HellaSwag example: "
                                 f"{problem}; {fix}")
        yield {**row, "label": int(row["label"])}  # the hub's label is a string, "3"
    if data_file and i < 0:  # an empty file: said in one line, never a silent "no HellaSwag"
        raise HellaSwagError(f"{data_file} holds no HellaSwag examples; pass the val split's file")


def examples_for_run(data_file=None, limit=0, say=print):
    """The val examples a training run scores (the first `limit`; 0: all), or None where there are
    none to have (offline with nothing cached, no `datasets`, not a HellaSwag file): the run trains
    on without them, and `say` prints one line saying why. A --hellaswag-file that is not there is a
    mistake, not a reason to train without: it stops the run."""
    if data_file and not os.path.isfile(data_file):
        sys.exit(f"error: --hellaswag-file {data_file} not found")
    try:
        return list(iterate_examples("val", data_file=data_file))[:limit or None]
    except HellaSwagError as e:
        say(f"HellaSwag is off for this run: {e}"
            + ("" if data_file else "; pass --hellaswag-file PATH for a local copy"))
        return None


def render_example(example, enc=None, block_size=None):
    """Tokenise one example into its 4 candidate rows.

    Returns (data, tokens, mask, label): tokens (4, L) int64, context + ending per row, right-
    padded with 0 to the longest row; mask (4, L) is 1 exactly on the ending tokens (the only
    ones scored); label is the index of the correct ending.

    With block_size, a row longer than that keeps only its last block_size tokens, the most the
    model can read: the start of its context goes, every ending token stays (as lm-evaluation-
    harness cuts a long context). The first kept token has nothing before it to predict it, so
    an ending of block_size tokens or more is scored on its last block_size - 1 tokens.
    """
    enc = enc or gpt2_encoder()
    # encode_ordinary: a row's text is text, even if it spells a special token ("<|endoftext|>"
    # would make encode raise); for any other text the ids are encode's
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    # " " + ending: the ending follows the context after a space, and GPT-2's BPE folds that
    # space into the ending's first token (" cat" is one token, "cat" another)
    ending_tokens = [enc.encode_ordinary(" " + end) for end in example["endings"]]
    rows = [ctx_tokens + end for end in ending_tokens]
    if block_size:
        rows = [row[-block_size:] for row in rows]
    L = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), L), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (row, end) in enumerate(zip(rows, ending_tokens)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, max(len(row) - len(end), 0):len(row)] = 1
    label = int(example["label"])
    data = {"label": label, "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    return data, tokens, mask, label


# ----------------------------------------------------------------------------- scoring

def row_losses(tokens, mask, logits):
    """Summed and mean cross-entropy over each row's masked (ending) tokens: two (R,) tensors.

    tokens, mask (R, L); logits (R, L, V). The logits at position t predict token t+1, so
    positions 0..L-2 are scored against tokens 1..L-1 and the mask shifts with the targets.
    Only the ending positions are scored at all (the context and the padding never count), in
    float32 whatever the logits' dtype: bf16 losses would turn near-ties into coin flips.
    """
    scored = mask[:, 1:].bool()                                # (R, L-1): position t -> token t+1
    # (N, V) -> (N,) for the N scored positions only: a fraction of the (R, L-1, V) logits
    picked = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored],
                             reduction="none")
    losses = torch.zeros(scored.shape, device=picked.device)              # (R, L-1)
    losses[scored] = picked
    sum_loss = losses.sum(dim=1)                                         # (R,)
    return sum_loss, sum_loss / scored.sum(dim=1)


def score_rows(tokens, mask, logits):
    """(pred, pred_norm) of one example: the row with the lowest summed loss (acc) and the row
    with the lowest average loss (acc_norm). Ties go to the lower index."""
    sum_loss, mean_loss = row_losses(tokens, mask, logits)
    return sum_loss.argmin().item(), mean_loss.argmin().item()


def get_most_likely_row(tokens, mask, logits):
    """The row acc_norm picks: the lowest average loss over the ending tokens."""
    return score_rows(tokens, mask, logits)[1]


@torch.no_grad()
def predictions(model_fn, examples, batch_size=1, device="cpu", enc=None, block_size=1024):
    """Yield (label, pred, pred_norm) per example, scoring batch_size examples per forward pass.

    model_fn maps tokens (B, T) to logits (B, T, V), e.g. `lambda idx: model(idx)[0]` for our
    GPT or `lambda idx: model(idx).logits` for Hugging Face's. The 4 rows of each example are
    stacked with the other examples' rows and right-padded to the longest: attention is causal,
    so padding after a row's end cannot change the logits of its real tokens, and it is masked
    out of the loss. The predictions thus equal the one-example-at-a-time loop's. A row longer
    than block_size (the model's context: 1024 for GPT-2, n_positions in Hugging Face's config)
    is scored on its last block_size tokens (render_example), so no forward pass is longer.
    """
    examples = iter(examples)
    while batch := list(itertools.islice(examples, batch_size)):
        rendered = [render_example(ex, enc, block_size) for ex in batch]
        T = max(tokens.size(1) for _, tokens, _, _ in rendered)
        # (4 * len(batch), T): every example's 4 rows, each right-padded with 0 to T
        tokens = torch.cat([F.pad(t, (0, T - t.size(1))) for _, t, _, _ in rendered])
        mask = torch.cat([F.pad(m, (0, T - m.size(1))) for _, _, m, _ in rendered])
        logits = model_fn(tokens.to(device))                             # (4 * len(batch), T, V)
        sum_loss, mean_loss = row_losses(tokens.to(logits.device), mask.to(logits.device), logits)
        preds = sum_loss.view(-1, 4).argmin(dim=1).tolist()              # len(batch) ints
        preds_norm = mean_loss.view(-1, 4).argmin(dim=1).tolist()
        yield from zip([label for *_, label in rendered], preds, preds_norm)


def evaluate(model_fn, examples, batch_size=1, device="cpu", enc=None, log_every=0,
             block_size=1024):
    """Counts (n, correct, correct_norm) over examples; acc = correct / n, acc_norm likewise.
    Under DDP each rank can take its share, `itertools.islice(examples, rank, None, world)`,
    and the ranks' counts be summed. block_size: the model's context, as in predictions."""
    n = correct = correct_norm = 0
    for label, pred, pred_norm in predictions(model_fn, examples, batch_size, device, enc,
                                              block_size):
        n += 1
        correct += pred == label
        correct_norm += pred_norm == label
        if log_every and n % log_every == 0:
            print(f"{n:6d} examples | acc {correct / n:.4f} | acc_norm {correct_norm / n:.4f}")
    return n, correct, correct_norm


# ----------------------------------------------------------------------------- main

def load_model(name, device):
    """(model_fn, block_size) for a hub name, a save_pretrained directory or a checkpoint of
    stage 7 (a file), in float32: model_fn maps tokens (B, T) to logits (B, T, 50257), block_size
    is the longest T the model takes (its position embeddings)."""
    if name.endswith(".pt") or os.path.isfile(name):  # log/model_19073.pt
        from export_hf import CheckpointError, gpt_from_checkpoint  # stage 7's GPT, its weights
        try:
            model = gpt_from_checkpoint(name)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        model.to(device).eval()
        # its vocab is padded to 50304; the 47 padding ids are never real tokens, so only the first
        # 50257 logits are scored, as GPT2LMHeadModel (and the export of these weights) scores them
        return lambda idx: model(idx)[0][..., :50257], model.config.block_size
    from safetensors import SafetensorError
    from transformers import GPT2LMHeadModel  # heavy import, only the CLI needs it
    try:
        model = GPT2LMHeadModel.from_pretrained(name, dtype=torch.float32)
    except OSError as e:  # HF raises OSError when the hub is unreachable or the name is unknown
        sys.exit(f"error: could not load model {name!r}: {str(e).splitlines()[0]}")
    # a cut-off copy or download: "Error while deserializing header: ..."
    except SafetensorError as e:
        sys.exit(f"error: could not load model {name!r}: {damaged_weights(name)} cannot be read "
                 f"({str(e).splitlines()[0]}), truncated or damaged; export it again "
                 "(export_hf.py) or download it again")
    model.to(device).eval()
    return lambda idx: model(idx).logits, model.config.n_positions


def damaged_weights(name):
    """The .safetensors files of a folder that safetensors cannot open, for the error message."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isdir(name):  # a hub name: the file is somewhere in the HF cache
        return "its model.safetensors in the Hugging Face cache"
    bad = []
    for path in sorted(Path(name).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):  # reads the header only
                pass
        except SafetensorError:
            bad.append(str(path))
    return ", ".join(bad) or f"a .safetensors file in {name}"


def device_problem(name):
    """Why `name` is no device of this machine (one phrase), or None."""
    try:
        device = torch.device(name)
    # "Expected one of cpu, cuda, ... device type at start of device string: tpu"
    except RuntimeError:
        return "not a device name (cpu, cuda, cuda:1, mps)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "no Apple GPU (mps) here"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"{device.type} is not supported here (cpu, cuda, mps)"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("-m", "--model", default="gpt2",
                        help="HF hub name (gpt2, gpt2-xl, ...), a save_pretrained directory, or a "
                             "checkpoint file of 7_train_ddp_fineweb.py (log/model_19073.pt); "
                             "default: %(default)s")
    parser.add_argument("-d", "--device", default="auto",
                        help="auto (first of cuda, mps, cpu; the default), cpu, cuda, cuda:1, mps")
    parser.add_argument("--split", default="val", choices=["train", "val"],
                        help="default: %(default)s (test has no labels)")
    parser.add_argument("--data-file", default=None,
                        help="a local copy instead of the hub: jsonl (the original format or the "
                             "hub's) or the hub's .parquet")
    parser.add_argument("--cache-dir", default=None,
                        help="the `datasets` cache for the hub dataset "
                             "(default: ~/.cache/huggingface)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="examples per forward pass (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N examples (default: all)")
    parser.add_argument("--log-every", type=int, default=500,
                        help="progress line every N examples (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--log-every", args.log_every, 0)):
        if value is not None and value < least:
            sys.exit(f"error: {flag} {value} is out of range; pass an integer {least} or more")

    device = args.device
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    problem = device_problem(device)
    if problem:
        sys.exit(f"error: -d {device}: {problem}; pass -d auto or cpu")
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32, as the lecture's figures were made

    try:
        gpt2_encoder()
    except HellaSwagError as e:
        sys.exit(f"error: {e}")
    try:
        examples = list(itertools.islice(
            iterate_examples(args.split, args.data_file, args.cache_dir), args.limit))
    except (HellaSwagError, OSError) as e:  # offline with nothing cached, or a bad --data-file
        hint = ("" if args.data_file
                else "; pass --data-file PATH to read a local copy (jsonl or parquet)")
        sys.exit(f"error: {e}{hint}")
    if not examples:
        sys.exit("error: no examples to evaluate")
    model_fn, block_size = load_model(args.model, device)
    print(f"evaluating {args.model} on {len(examples)} HellaSwag {args.split} examples on {device}")
    n, correct, correct_norm = evaluate(model_fn, examples, args.batch_size, device,
                                        log_every=args.log_every, block_size=block_size)
    print(f"acc {correct / n:.4f} acc_norm {correct_norm / n:.4f} over {n} examples")


if __name__ == "__main__":
    main()
