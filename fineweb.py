"""FineWeb-Edu sample-10BT -> GPT-2 tokens in uint16 shards (the data of 7_train_ddp_fineweb.py).

Each document becomes [<|endoftext|>] + its GPT-2 BPE tokens, and the documents are laid end
to end and cut into shards of exactly --shard-size tokens (default 100M): a document that
does not fit fills the shard and its remainder starts the next one. Shard 0 is the `val`
split, the rest `train`, each written with np.save as edufineweb_{split}_{index:06d}.npy.
Same documents and shard size give the very bytes the lecture's fineweb.py writes.

Beyond the lecture's script:
  - the Pool lives under `if __name__ == "__main__"`: where workers are spawned (macOS,
    Windows) each one imports this file, and a Pool made at import time crashes them
  - --data-files tokenises local json/jsonl/parquet/txt files instead (offline, tests); they are
    read whole once before anything is written, so that a file that is not UTF-8, a line that is
    not JSON or a record without text is one line naming it, not a run that stops halfway
  - a shard is written to a temporary file and renamed, so a shard on disk is complete, and
    fineweb_manifest.json records where each shard ended in the documents: an interrupted
    run, started again, goes on after its last complete shard with the same bytes; a full
    disk is one line naming the file, and the shards before it stay
  - --download fetches shards already tokenised instead, from the hub dataset
    kjj0/finewebedu10B-gpt2 (the one modded-nanogpt's data/cached_finewebedu10B.py fetches):
    100M-token llm.c .bin files (256 int32 of header: magic 20240520, version 1, token count;
    then the uint16 tokens). One at a time, each .bin comes through huggingface_hub (so
    HF_ENDPOINT mirrors work), its header is checked, it is written as the same kind of .npy
    and deleted; a rerun skips the complete shards. Whether its tokens are this script's, byte
    for byte, is not verified here: docs/data.md says what is known and how to check

Run:
    python fineweb.py                     # download (tens of GB) + ~100 shards, ~10B tokens
    python fineweb.py --streaming         # same shards, reading the parquet files as it goes
    python fineweb.py --download          # the tokenised shards instead: ~20 GB, no tokenising
    python fineweb.py --download --max-shards 10   # val + 9 train shards (~2 GB) to start with
    python fineweb.py --data-files my.jsonl --shard-size 1048577 --out-dir /tmp/shards
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
from contextlib import suppress
from functools import lru_cache
from itertools import islice, takewhile
from pathlib import Path

import numpy as np
from tqdm import tqdm

HUB_PATH, HUB_NAME = "HuggingFaceFW/fineweb-edu", "sample-10BT"  # ~10B GPT-2 tokens
EOT = 50256  # <|endoftext|>, GPT-2's one special token: it opens every document
EXTENSIONS = (".json", ".jsonl", ".parquet", ".txt")
# Neither name holds "train" or "val", so a loader that picks shards by those words skips them.
MANIFEST, TMP = "fineweb_manifest.json", ".writing.tmp"
# --download: FineWeb-Edu 10B in 100M-token shards, already tokenised, in the .bin format of llm.c's
# dev/data/data_common.py; modded-nanogpt's data/cached_finewebedu10B.py fetches the same files
TOKENS_REPO, TOKENS_FILES = "kjj0/finewebedu10B-gpt2", 100  # val_000000, train_000001..99
# a .bin's header: 256 int32, [magic, version, n_tokens, 0...]
BIN_MAGIC, BIN_VERSION, BIN_HEADER = 20240520, 1, 256
DOWNLOAD_DIR = ".download"  # in --out-dir: the one .bin being fetched (and the hub client's notes)


class InputError(Exception):
    """Bad arguments, input, out-dir state or a failed write: one line, without a traceback."""


@lru_cache(maxsize=None)
def encoder():
    import tiktoken  # loaded on first use, once per process: importing fineweb.py stays free
    return tiktoken.get_encoding("gpt2")


def tokenize(text):
    """One document -> uint16 array [EOT, tokens...]. encode_ordinary: a literal
    "<|endoftext|>" inside web text is plain text, not a document boundary."""
    tokens = np.array([EOT] + encoder().encode_ordinary(text))
    assert (tokens < 2**16).all(), "GPT-2 ids (< 50257) must fit in uint16"
    return tokens.astype(np.uint16)


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process alone stops the run


def tokenized(texts, workers, stop):
    """tokenize() over `texts`, results in document order, spread over `workers` processes.
    Setting the threading.Event `stop` ends the input early; the documents already sent out
    still come back, so the pool winds down idle (terminating a Pool that imap is still
    feeding can hang)."""
    texts = takewhile(lambda _: not stop.is_set(), texts)
    if workers == 1:
        yield from map(tokenize, texts)
        return
    with mp.Pool(workers, initializer=ignore_sigint) as pool:
        # chunksize 16: documents travel to the workers in batches, so pickling overhead stays small
        yield from pool.imap(tokenize, texts, chunksize=16)


def file_texts(path, text_field):
    """The documents of one local file: a whole .txt, or the `text_field` of each record. A file
    that is not UTF-8 (Latin-1, binary) or not JSON raises InputError naming it (and the line)."""
    fix = "convert or fix it, or leave it out of --data-files"
    if path.suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")  # as is: read_text() would turn \r\n into \n
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start:,}); {fix}") from None
        yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`
        try:
            pf = pq.ParquetFile(path)
        except ValueError as e:  # pyarrow's ArrowInvalid
            raise InputError(f"{path}: not a parquet file ({str(e).splitlines()[0]}); "
                             f"{fix}") from None
        if text_field not in pf.schema_arrow.names:
            raise InputError(f"{path}: no column {text_field!r}")
        for batch in pf.iter_batches(columns=[text_field]):  # a batch at a time, not the whole file
            yield from batch.column(0).to_pylist()
    else:  # .json / .jsonl: one record per line, or (.json) one array of records
        with open(path, "rb") as f:  # bytes, decoded line by line: an error names its line
            is_array = f.read(100).lstrip().startswith(b"[")
            f.seek(0)
            for line, raw in enumerate([f.read()] if is_array else f, 1):
                try:
                    text = raw.decode("utf-8")
                    records = (json.loads(text) if is_array
                               else [json.loads(text)] if text.strip() else [])
                except UnicodeDecodeError as e:
                    line += raw[:e.start].count(b"\n")  # (a .json array is one `raw` of many lines)
                    raise InputError(f"{path}, line {line}: not UTF-8 text; {fix}") from None
                except ValueError as e:  # JSONDecodeError; in a .json array its lineno is the line
                    line = e.lineno if is_array else line
                    raise InputError(f"{path}, line {line}: not JSON ({e.msg}); {fix}") from None
                for record in records:
                    yield record.get(text_field) if isinstance(record, dict) else None


def local_texts(paths, text_field):
    for path in paths:
        for i, text in enumerate(file_texts(path, text_field)):
            if not isinstance(text, str):
                raise InputError(f"{path}: record {i} has no string field {text_field!r}")
            yield text


def hub_texts(streaming, text_field, skip):
    from datasets import load_dataset  # a heavy import, paid only when the hub is used
    try:
        ds = load_dataset(HUB_PATH, name=HUB_NAME, split="train", streaming=streaming)
    except ConnectionError as e:  # what `datasets` raises offline
        raise InputError(f"could not reach the Hugging Face hub for {HUB_PATH} ({e}); "
                         "offline, tokenise local files with --data-files FILE ...") from None
    return (doc[text_field] for doc in ds.skip(skip))


def write_atomic(path, write):
    """write(f) into a temporary file beside `path`, then rename: readers never see half a file.
    A failed write (a full disk: ENOSPC) leaves the complete files as they were, and no
    temporary."""
    tmp = path.parent / TMP
    try:
        with open(tmp, "wb") as f:  # a file handle: np.save("x.tmp") would write "x.tmp.npy"
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise InputError(f"could not write {path} ({e.strerror or e}); the files written "
                             "before it are complete: make room and run the same command "
                             "again") from None
        raise


def load_manifest(out_dir, config, overwrite):
    """The manifest to continue from: an earlier run's with the same config, or a fresh one.
    {"source": ..., "shard_size": N, "done": bool, "shards": [{"file", "tokens", "next_doc",
    "offset"}, ...]}: after each shard, the next one starts in document `next_doc`, of which
    `offset` tokens are already written (0 when the shard ended on a document boundary)."""
    path, fresh = out_dir / MANIFEST, dict(config, shards=[], done=False)
    if overwrite:
        return fresh
    if path.exists():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # not UTF-8, not JSON: not a manifest this script wrote
            raise InputError(f"{path} is not a manifest fineweb.py can read; "
                             "pass another --out-dir, or --overwrite to start again") from None
        if not manifest.get("shards") and not any(out_dir.glob("edufineweb_*.npy")):
            # an earlier run that wrote no shard (it failed, or was stopped): nothing to keep
            return fresh
        if {k: manifest.get(k) for k in config} != config:
            raise InputError(f"{out_dir} holds shards of another --shard-size or source; "
                             "pass another --out-dir, or --overwrite to start again")
        # A shard on disk is complete (atomic writes); keep the listed shards up to a missing one.
        shards, kept = manifest["shards"], 0
        while kept < len(shards) and (out_dir / shards[kept]["file"]).exists():
            kept += 1
        if kept < len(shards):
            manifest["shards"], manifest["done"] = shards[:kept], False
        return manifest
    if any(out_dir.glob("edufineweb_*.npy")):
        raise InputError(f"{out_dir} holds shards but no {MANIFEST}; "
                         "pass another --out-dir, or --overwrite to start again")
    return fresh


def hub_download(filename, local_dir):
    """One file of TOKENS_REPO into local_dir by the hub client: it reads HF_ENDPOINT (mirrors) and
    HF_TOKEN, resumes what it can, and with local_dir it keeps no second copy in the hub cache."""
    # Xet-stored files: no chunk cache (up to 10 GB in HF_HOME/xet), unless the user asks for one
    os.environ.setdefault("HF_XET_CHUNK_CACHE_SIZE_BYTES", "0")
    from huggingface_hub import hf_hub_download  # comes with `datasets`; imported only here
    return Path(hf_hub_download(repo_id=TOKENS_REPO, filename=filename, repo_type="dataset",
                                local_dir=local_dir))


def bin_tokens(path):
    """The uint16 tokens of an llm.c .bin shard, memory-mapped, once its header checks out."""
    size, want = path.stat().st_size, 4 * BIN_HEADER
    header = np.fromfile(path, dtype="<i4", count=BIN_HEADER)
    if len(header) < BIN_HEADER:
        raise InputError(f"{path.name}: {size} bytes, shorter than the {want}-byte llm.c header")
    magic, version, n = (int(v) for v in header[:3])
    if magic != BIN_MAGIC or version != BIN_VERSION:
        raise InputError(f"{path.name}: header magic {magic}, version {version}, not llm.c's GPT-2 "
                         f"token file (magic {BIN_MAGIC}, version {BIN_VERSION})")
    if n < 1 or size != want + 2 * n:
        raise InputError(f"{path.name}: the header says {n:,} tokens, the file holds "
                         f"{(size - want) / 2:,.1f} (damaged or cut short)")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=want, shape=(n,))
    if tokens.max() > EOT:
        raise InputError(f"{path.name}: ids above {EOT}, so not GPT-2 tokens")
    return tokens


def bin_to_npy(path, npy):
    """The .bin at `path` written as `npy` (np.save's bytes); returns its token count. A bad .bin
    is deleted, so that a rerun fetches it afresh."""
    try:
        tokens = bin_tokens(path)
    except InputError:
        path.unlink()
        raise
    write_atomic(npy, lambda f: np.save(f, tokens))
    return len(tokens)  # (the memory map closes here, before the .bin is deleted)


def download(args, out_dir):
    """--download: shard after shard, fetch the .bin into out_dir/DOWNLOAD_DIR, check it, write it
    as edufineweb_{split}_{index:06d}.npy (the bytes np.save writes for the same tokens), record it
    in the manifest, delete the .bin. At most one .bin and one shard in the making are on disk."""
    config = {"source": {"dataset": TOKENS_REPO}, "shard_size": 10**8}
    manifest = load_manifest(out_dir, config, args.overwrite)
    shards = manifest["shards"]
    total = TOKENS_FILES if args.max_shards is None else min(args.max_shards, TOKENS_FILES)
    if manifest["done"] or len(shards) >= total:
        print(f"{out_dir}: {len(shards)} shards already written, nothing to do")
        return
    if shards:
        print(f"resuming after shard {len(shards) - 1}")
    fetch_dir, made_out_dir = out_dir / DOWNLOAD_DIR, not out_dir.exists()
    if args.overwrite:
        for f in out_dir.glob("edufineweb_*.npy"):
            f.unlink()
        shutil.rmtree(fetch_dir, ignore_errors=True)

    def save_manifest():
        write_atomic(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(len(shards), total):
        split = "val" if index == 0 else "train"
        remote, name = f"finewebedu_{split}_{index:06d}.bin", f"edufineweb_{split}_{index:06d}.npy"
        try:
            path = hub_download(remote, fetch_dir)
        # offline, unreachable, not found, disk full: each client version has its own exceptions
        except Exception as e:
            if not any(p.is_file() for p in fetch_dir.rglob("*.incomplete")):  # nothing to resume
                shutil.rmtree(fetch_dir, ignore_errors=True)
                if made_out_dir:
                    with suppress(OSError):
                        out_dir.rmdir()  # only if empty: the folder this run made
            reason = (str(e).strip().splitlines() or [""])[0]
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            raise InputError(f"could not download {remote} from the hub dataset {TOKENS_REPO} "
                             f"({type(e).__name__}: {reason}); check the connection "
                             "(or HF_ENDPOINT, for a mirror), or run plain `python fineweb.py` "
                             "to tokenise the FineWeb-Edu text instead") from None
        shards.append({"file": name, "tokens": bin_to_npy(path, out_dir / name)})
        manifest["done"] = len(shards) == TOKENS_FILES
        save_manifest()
        path.unlink()
        print(f"{name}: {shards[-1]['tokens']:,} tokens")
    shutil.rmtree(fetch_dir, ignore_errors=True)  # only the hub client's notes are left in it
    print(f"{len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens in {out_dir}")


def run(args):
    for flag, value, least in (("--shard-size", args.shard_size, 1), ("--workers", args.workers, 1),
                               ("--max-shards", args.max_shards, 0)):  # 0: nothing to do
        if value is not None and value < least:
            raise InputError(f"{flag} {value} is out of range; pass an integer {least} or more")
    out_dir = Path(args.out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file, not a folder; "
                         "pass a folder (it is made if missing)")
    if args.download:
        if args.data_files or args.streaming or args.shard_size != 10**8:
            raise InputError("--download fetches the hub's 100M-token shards: it takes no "
                             "--data-files, --streaming or --shard-size")
        return download(args, out_dir)
    if args.data_files:
        paths = [Path(p).resolve() for p in args.data_files]
        for p in paths:
            if not p.is_file():
                raise InputError(f"no such file: {p}")
            if p.suffix not in EXTENSIONS:
                raise InputError(f"{p}: unsupported file type (use {' '.join(EXTENSIONS)})")
            if p == out_dir / MANIFEST:
                raise InputError(f"{p} is the manifest this run writes in --out-dir; "
                                 "pass another --out-dir")
        # read them whole once before anything is written: a file that is not UTF-8, a line that
        # is not JSON, a record without text stops the run here, not after the shards before it
        n_docs = n_chars = 0
        for text in local_texts(paths, args.text_field):
            n_docs, n_chars = n_docs + 1, n_chars + len(text)
        # (an empty document is one, <|endoftext|>, as in the lecture's shards, but none at all)
        if not n_chars:
            raise InputError(f"the --data-files hold no text ({n_docs} document(s), all empty); "
                             "pass files with text")
        # sizes too: a file edited since the interrupted run must not be resumed into
        source = {"data_files": [[str(p), p.stat().st_size] for p in paths]}
    else:
        source = {"dataset": f"{HUB_PATH}/{HUB_NAME}"}
    source["text_field"] = args.text_field
    config = {"source": source, "shard_size": args.shard_size}
    manifest = load_manifest(out_dir, config, args.overwrite)
    shards = manifest["shards"]
    if manifest["done"] or (args.max_shards is not None and len(shards) >= args.max_shards):
        print(f"{out_dir}: {len(shards)} shards already written, nothing to do")
        return

    # Where the next shard starts: document `start`, minus the `offset` tokens that went to the
    # shard before it. A resumed run skips the documents before it without tokenising them.
    start, offset = (shards[-1]["next_doc"], shards[-1]["offset"]) if shards else (0, 0)
    if args.data_files:
        texts = islice(local_texts(paths, args.text_field), start, None)
    else:
        texts = hub_texts(args.streaming, args.text_field, start)
    try:  # here, once, so that a missing BPE file is one clear line, not a traceback per worker
        encoder()  # (forked workers inherit it; spawned ones read tiktoken's cache it just filled)
    except OSError as e:
        raise InputError(f"could not load the GPT-2 BPE files ({type(e).__name__}); offline, point "
                         "TIKTOKEN_CACHE_DIR at a folder that holds them") from None
    if shards:
        print(f"resuming after shard {len(shards) - 1}: document {start}, token {offset}")

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for f in out_dir.glob("edufineweb_*.npy"):
            f.unlink()

    def save_manifest():
        write_atomic(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

    def save_shard(tokens, next_doc, next_offset):
        split = "val" if not shards else "train"  # the first shard is held out for validation
        name = f"edufineweb_{split}_{len(shards):06d}.npy"
        write_atomic(out_dir / name, lambda f: np.save(f, tokens))
        shards.append({"file": name, "tokens": len(tokens), "next_doc": next_doc,
                       "offset": next_offset})
        save_manifest()

    save_manifest()  # from now on a restart knows the config, even before shard 0 is complete
    shard_size = args.shard_size
    buf, fill = np.empty(shard_size, dtype=np.uint16), 0  # the shard being filled
    stop = threading.Event()
    docs = tokenized(texts, args.workers, stop)
    with tqdm(total=shard_size, unit="tok", desc=f"shard {len(shards)}") as bar:
        for doc, tokens in enumerate(docs, start=start):
            pos = offset if doc == start else 0
            while pos < len(tokens):  # a long document may fill several shards
                n = min(shard_size - fill, len(tokens) - pos)
                buf[fill:fill + n] = tokens[pos:pos + n]
                fill, pos = fill + n, pos + n
                bar.update(n)
                if fill < shard_size:
                    continue
                # full: the next shard starts after this document, or inside it if tokens are left
                save_shard(buf, *((doc, pos) if pos < len(tokens) else (doc + 1, 0)))
                fill = 0
                if len(shards) == args.max_shards:
                    stop.set()
                    for _ in docs:  # take back what the workers already have
                        pass
                    print(f"stopped after {len(shards)} shards (--max-shards); run again to go on")
                    return
                bar.reset()
                bar.set_description(f"shard {len(shards)}")
    if fill:  # the last shard holds what is left (the lecture skips it only when empty)
        save_shard(buf[:fill], doc + 1, 0)
    manifest["done"] = True
    save_manifest()
    print(f"{len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens in {out_dir}")
    if len(shards) == 1:  # said, not silent: stage 7 would refuse this folder
        print(f"note: only the val shard ({shards[0]['tokens']:,} tokens): "
              "7_train_ddp_fineweb.py needs a train shard too; pass more text or a smaller "
              "--shard-size (and --overwrite)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("--out-dir", default=Path(__file__).resolve().parent / "edu_fineweb10B",
                        help="default: edu_fineweb10B next to this file")
    parser.add_argument("--shard-size", type=int, default=10**8, help="tokens per shard (100M)")
    parser.add_argument("--data-files", nargs="+", metavar="PATH",
                        help="local .json/.jsonl/.parquet/.txt files instead of the hub "
                             "(a .txt file is one document)")
    parser.add_argument("--text-field", default="text", help="field holding a record's text")
    parser.add_argument("--streaming", action="store_true",
                        help="hub: read the parquet files as it goes instead of downloading first")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="tokenising processes (default: all cores)")
    parser.add_argument("--download", action="store_true",
                        help=f"fetch the shards already tokenised (hub dataset {TOKENS_REPO}) "
                             "instead of tokenising the text")
    parser.add_argument("--max-shards", type=int, help="stop once this many shards exist "
                        "(--download --max-shards 10: val + 9 train shards)")
    parser.add_argument("--overwrite", action="store_true", help="discard the shards in --out-dir")
    args = parser.parse_args(argv)
    try:
        run(args)
    except InputError as e:
        sys.exit(f"fineweb.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("fineweb.py: interrupted; run the same command again to go on after the last "
                 "complete shard")


if __name__ == "__main__":
    main()
