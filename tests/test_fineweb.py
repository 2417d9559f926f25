"""fineweb.py on a small local corpus: the shard layout docs/data.md gives, byte-identity
with the lecture's loop, every input format, resume after an interruption, clear errors; and
--download from a stand-in for the hub: a folder of llm.c .bin files, served either
by a stand-in for the one function that calls the hub client or over HTTP as an HF_ENDPOINT mirror."""
import errno
import hashlib
import http.server
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, main_error, run7, run_here, run_script

import fineweb

EOT = 50256
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we can been has their more when "
         "will would who so no learning energy cells water history students because however "
         "photosynthesis équipe naïve 東京 🙂").split()


def make_docs(n=200, seed=0):
    """English-like documents of very different lengths, with the awkward cases mixed in."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / 150)))]
        for j in range(0, len(words), rng.randint(8, 20)):  # sentences and paragraphs
            words[j] = words[j].capitalize() + (".\n\n" if rng.random() < 0.2 else ",")
        docs.append(" ".join(words))
    docs[3] = ""                                                # a document with no text at all
    docs[7] = "A literal <|endoftext|> in web text is just text."
    docs[11] = "Windows line ends\r\nstay as they are.\r\n"
    docs[20] = " ".join(rng.choice(WORDS) for _ in range(3500))  # longer than a small shard
    docs[21] = " ".join(rng.choice(WORDS) for _ in range(2500))
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def doc_tokens(docs, enc):
    """What each document must become: [<|endoftext|>] + its GPT-2 tokens."""
    return [np.array([EOT] + enc.encode_ordinary(d), dtype=np.uint16) for d in docs]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return path


def fw(*args, workers=1):
    """fineweb.main in this process (workers=1: no Pool, fast); an error raises SystemExit. A Pool's workers
    come from a fresh forkserver, never a fork of this process: its other threads (torch's, tiktoken's) may
    hold a lock at that instant, and a forked worker then waits for it forever."""
    import multiprocessing
    from unittest import mock
    with mock.patch.object(fineweb, "mp", multiprocessing.get_context("forkserver")):
        fineweb.main([str(a) for a in args] + ["--workers", str(workers)])


def shard_files(out_dir):
    return sorted(out_dir.glob("edufineweb_*.npy"), key=lambda p: p.name[-10:])  # by index


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in shard_files(out_dir)}


def lecture_shards(doc_tokens, shard_size, out_dir):
    """The lecture's fineweb.py loop without the download and the Pool: fill a buffer; the
    document that does not fit is split, its head completes the shard, its tail starts the next;
    the last partial shard is written only if non-empty. (It assumes no document is longer than
    a shard, which holds for 100M-token shards.)"""
    out_dir.mkdir()
    buf, count, index = np.empty((shard_size,), dtype=np.uint16), 0, 0
    for tokens in doc_tokens:
        if count + len(tokens) < shard_size:
            buf[count:count + len(tokens)] = tokens
            count += len(tokens)
        else:
            remainder = shard_size - count
            buf[count:count + remainder] = tokens[:remainder]
            split = "val" if index == 0 else "train"
            np.save(str(out_dir / f"edufineweb_{split}_{index:06d}"), buf)  # np.save adds .npy
            index += 1
            buf[0:len(tokens) - remainder] = tokens[remainder:]
            count = len(tokens) - remainder
    if count != 0:
        split = "val" if index == 0 else "train"
        np.save(str(out_dir / f"edufineweb_{split}_{index:06d}"), buf[:count])


def one_error_line(stderr):
    """The one line that explains the failure (a progress bar may stand above it)."""
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith(lines[0]), stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------

def test_cli_shards_cut_exactly(tmp_path, docs, doc_tokens):
    """Names, dtype, val first, full shards of exactly --shard-size, and the shards laid end to
    end are the documents' tokens laid end to end: every boundary split is right."""
    size = 1500
    data = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "shards"
    r = run_here("fineweb", "--data-files", data, "--shard-size", size, "--out-dir", out, "--workers", 1)
    assert r.returncode == 0, r.stderr
    stream = np.concatenate(doc_tokens)
    n = -(-len(stream) // size)
    assert max(len(t) for t in doc_tokens) > 2 * size  # some document spans three shards
    assert [p.name for p in shard_files(out)] == (
        ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)])
    shards = [np.load(p) for p in shard_files(out)]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert all(len(s) == size for s in shards[:-1]) and 0 < len(shards[-1]) <= size
    got = np.concatenate(shards)
    np.testing.assert_array_equal(got, stream)
    # <|endoftext|> opens every document and appears nowhere else (docs[7] spells it out as text)
    starts = np.cumsum([0] + [len(t) for t in doc_tokens[:-1]])
    np.testing.assert_array_equal(np.flatnonzero(got == EOT), starts)
    # and each file is exactly what np.save writes for its slice of the stream
    for i, p in enumerate(shard_files(out)):
        buf = io.BytesIO()
        np.save(buf, stream[i * size:(i + 1) * size])
        assert p.read_bytes() == buf.getvalue(), p.name


@pytest.mark.parametrize("exact", [False, True], ids=["ragged-end", "exact-multiple"])
def test_byte_identical_to_lecture(tmp_path, docs, doc_tokens, enc, exact):
    """Same documents + same shard size => the lecture's files, byte for byte; when the tokens
    fill the last shard exactly there is no empty trailing shard (as in the lecture)."""
    size = 4000  # longer than every document, as the lecture's loop assumes
    assert max(len(t) for t in doc_tokens) < size
    docs, doc_tokens = list(docs), list(doc_tokens)
    if exact:  # one more document, "a a a ...", sized so the tokens end on a shard boundary
        n = (-sum(len(t) for t in doc_tokens) - 1) % size + size
        docs.append(" ".join(["a"] * n))
        doc_tokens.append(np.array([EOT] + enc.encode_ordinary(docs[-1]), dtype=np.uint16))
        assert sum(len(t) for t in doc_tokens) % size == 0
    lecture_shards(doc_tokens, size, tmp_path / "lecture")
    fw("--data-files", write_jsonl(tmp_path / "c.jsonl", docs), "--shard-size", size,
       "--out-dir", tmp_path / "ours")
    expected = shard_bytes(tmp_path / "lecture")
    assert len(expected) >= 5
    assert shard_bytes(tmp_path / "ours") == expected


def test_input_formats_agree(tmp_path, docs):
    """jsonl, a json array, parquet (several row groups) and one .txt file per document all
    give the same shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    size = 3000
    outs = {}
    inputs = {"jsonl": [write_jsonl(tmp_path / "c.jsonl", docs)]}
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    inputs["json"] = [tmp_path / "c.json"]
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "c.parquet",
                   row_group_size=37)
    inputs["parquet"] = [tmp_path / "c.parquet"]
    (tmp_path / "txt").mkdir()
    inputs["txt"] = []
    for i, d in enumerate(docs):
        inputs["txt"].append(tmp_path / "txt" / f"doc{i:03d}.txt")
        inputs["txt"][-1].write_bytes(d.encode("utf-8"))
    for name, files in inputs.items():
        fw("--data-files", *files, "--shard-size", size, "--out-dir", tmp_path / name)
        outs[name] = shard_bytes(tmp_path / name)
    assert len(outs["jsonl"]) >= 10
    for name in inputs:
        assert outs[name] == outs["jsonl"], name


@pytest.mark.slow
def test_workers_give_identical_shards(tmp_path, docs):
    """1 process, a forked Pool, and a spawned Pool (macOS/Windows: each worker re-imports the
    script, which the __main__ guard makes harmless) write the same bytes."""
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    fw("--data-files", data, "--shard-size", 1500, "--out-dir", tmp_path / "w1", workers=1)
    fw("--data-files", data, "--shard-size", 1500, "--out-dir", tmp_path / "w2", workers=2)
    spawn = ("import multiprocessing as mp, runpy, sys; mp.set_start_method('spawn'); "
             "sys.argv[0] = 'fineweb.py'; runpy.run_path('fineweb.py', run_name='__main__')")
    r = run_script("fineweb", "--data-files", data, "--shard-size", 1500, "--out-dir",
                   tmp_path / "spawn", "--workers", 2, cmd=[sys.executable, "-c", spawn])
    assert r.returncode == 0, r.stderr
    assert len(shard_files(tmp_path / "w1")) >= 10
    assert shard_bytes(tmp_path / "w2") == shard_bytes(tmp_path / "w1")
    assert shard_bytes(tmp_path / "spawn") == shard_bytes(tmp_path / "w1")


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_resume_after_interruption(tmp_path, docs, monkeypatch, capsys):
    """Stop after k shards (the k-th ends inside a document), crash while writing shard k (a
    stale temporary file; the manifest one shard behind the disk), run again: the shards equal
    an uninterrupted run's, and the documents before the resume point are not tokenised again."""
    size = 1500
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    fw("--data-files", data, "--shard-size", size, "--out-dir", tmp_path / "full")
    full = json.loads((tmp_path / "full" / fineweb.MANIFEST).read_text())
    assert full["done"]
    assert [s["file"] for s in full["shards"]] == [p.name for p in shard_files(tmp_path / "full")]
    k = next(i + 1 for i, s in enumerate(full["shards"]) if i >= 3 and s["offset"] > 0)

    out = tmp_path / "resumed"
    fw("--data-files", data, "--shard-size", size, "--out-dir", out, "--max-shards", k + 1,
       workers=2)
    assert len(shard_files(out)) == k + 1
    manifest = json.loads((out / fineweb.MANIFEST).read_text())
    assert manifest["shards"] == full["shards"][:k + 1] and not manifest["done"]
    manifest["shards"].pop()  # the crash came after shard k's rename, before its manifest entry
    (out / fineweb.MANIFEST).write_text(json.dumps(manifest))
    (out / fineweb.TMP).write_bytes(b"half a shard")

    calls = []
    real = fineweb.tokenize
    monkeypatch.setattr(fineweb, "tokenize", lambda text: calls.append(text) or real(text))
    capsys.readouterr()
    fw("--data-files", data, "--shard-size", size, "--out-dir", out)
    resume = full["shards"][k - 1]
    assert f"document {resume['next_doc']}, token {resume['offset']}" in capsys.readouterr().out
    assert calls == docs[resume["next_doc"]:]
    assert shard_bytes(out) == shard_bytes(tmp_path / "full")
    assert json.loads((out / fineweb.MANIFEST).read_text()) == full
    assert not (out / fineweb.TMP).exists()

    # a finished run started again does nothing
    calls.clear()
    fw("--data-files", data, "--shard-size", size, "--out-dir", out)
    assert calls == [] and "nothing to do" in capsys.readouterr().out


def test_other_config_refused_unless_overwrite(tmp_path, docs):
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    other = write_jsonl(tmp_path / "other.jsonl", docs[:50])
    out = tmp_path / "out"
    fw("--data-files", data, "--shard-size", 1000, "--out-dir", out)
    before = shard_bytes(out)
    for args in (["--data-files", data, "--shard-size", 3000],
                 ["--data-files", other, "--shard-size", 1000]):
        with pytest.raises(SystemExit) as e:
            fw(*args, "--out-dir", out)
        assert "--overwrite" in str(e.value.code) and "\n" not in str(e.value.code)
        assert shard_bytes(out) == before
    fw("--data-files", data, "--shard-size", 3000, "--out-dir", out, "--overwrite")
    fw("--data-files", data, "--shard-size", 3000, "--out-dir", tmp_path / "fresh")
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh")  # no shard of the old run is left
    # shards without a manifest (say, the lecture's own) are not touched either
    (out / fineweb.MANIFEST).unlink()
    with pytest.raises(SystemExit) as e:
        fw("--data-files", data, "--shard-size", 3000, "--out-dir", out)
    assert "--overwrite" in str(e.value.code)


@pytest.mark.parametrize("case", ["missing-file", "extension", "no-text-field"])
def test_bad_input_is_one_clear_line(tmp_path, docs, case):
    """Refused before anything in --out-dir is touched; a record without text is named."""
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    fw("--data-files", data, "--shard-size", 3000, "--out-dir", out, "--max-shards", 2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "c.csv").write_text("text\nhello\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    bad = {"missing-file": [data, tmp_path / "nope.jsonl"], "extension": [data, tmp_path / "c.csv"],
           "no-text-field": [tmp_path / "bad.jsonl"]}[case]
    if case == "no-text-field":  # found only while reading, so in a directory of its own
        out = tmp_path / "out2"
    r = run_here("fineweb", "--data-files", *bad, "--shard-size", 3000, "--out-dir", out, "--workers", 1)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert {"missing-file": "nope.jsonl", "extension": "c.csv",
            "no-text-field": "record 1 has no string field 'text'"}[case] in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


BAD_FILES = {  # file name -> (its bytes, what the one line says)
    "latin1.txt": ("Caf\u00e9 cr\u00e8me".encode("latin-1"), "latin1.txt: not UTF-8 text"),
    "binary.jsonl": (b"\x00\x9c\xff\xfe PK\x03\x04", "binary.jsonl, line 1: not UTF-8 text"),
    "latin1.jsonl": ('{"text": "a"}\n\n{"text": "caf\u00e9"}\n'.encode("latin-1"), "latin1.jsonl, line 3: not UTF-8"),
    "broken.jsonl": (b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "broken.jsonl, line 2: not JSON"),
    "broken.json": (b'[{"text": "a"},\n {"text": }]', "broken.json, line 2: not JSON"),
    "empty.txt": (b"", "hold no text (1 document(s), all empty)"),
    "blank.jsonl": (b'{"text": ""}\n', "hold no text (1 document(s), all empty)"),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "--shard-size 0", "--workers 0", "--max-shards -2",
                                  "out-dir-is-a-file", "data-file-is-the-manifest"])
def test_bad_file_or_flag_is_one_line_before_anything_is_written(tmp_path, docs, case):
    """A good file first, large enough for shards of its own: a file that is not UTF-8 or not JSON, an
    empty one, a flag out of range, an --out-dir that would take the place of an input: one line naming
    the file (and line) before anything is written, so the fixed rerun starts clean."""
    good, out = write_jsonl(tmp_path / "good.jsonl", docs), tmp_path / "out"
    argv = ["--shard-size", 1000, "--out-dir", out, "--workers", 1, "--data-files", good]
    if case in BAD_FILES:
        content, needle = BAD_FILES[case]
        (tmp_path / case).write_bytes(content)
        argv = argv[:-1] if case.startswith(("empty", "blank")) else argv  # refused when no file has text
        argv.append(tmp_path / case)
    elif case.startswith("--"):
        flag, value = case.split()
        argv, needle = argv + [flag, value], f"{case} is out of range"
    elif case == "out-dir-is-a-file":
        out.write_text("mine")
        needle = "is a file, not a folder"
    else:
        out.mkdir()
        (out / fineweb.MANIFEST).write_text('{"text": "mine"}\n')
        argv, needle = argv + [out / fineweb.MANIFEST], "is the manifest this run writes"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    message = main_error(fineweb, argv)
    assert needle in message, message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not out.exists() or case in ("out-dir-is-a-file", "data-file-is-the-manifest")


def test_rerun_after_a_run_that_wrote_no_shard(tmp_path, docs, monkeypatch):
    """A first run stopped before its first shard (Ctrl-C) leaves a manifest of no shards; the rerun, with
    the input fixed (another size), starts afresh instead of refusing "shards of another source"."""
    data, out = write_jsonl(tmp_path / "c.jsonl", docs[:40]), tmp_path / "out"

    def interrupted(text):
        raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(SystemExit, match="interrupted"):
        m.setattr(fineweb, "tokenize", interrupted)
        fw("--data-files", data, "--shard-size", 1000, "--out-dir", out)
    assert json.loads((out / fineweb.MANIFEST).read_text())["shards"] == []
    write_jsonl(data, docs)  # the fixed input
    fw("--data-files", data, "--shard-size", 1000, "--out-dir", out)
    fw("--data-files", data, "--shard-size", 1000, "--out-dir", tmp_path / "fresh")
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh") and len(shard_files(out)) > 2


def test_only_a_val_shard_is_said(tmp_path, capsys):
    """Input that fills no train shard: the val shard is written, and a note says stage 7 needs more."""
    data = tmp_path / "one.txt"
    data.write_text("A short document.")
    fw("--data-files", data, "--out-dir", tmp_path / "out")
    assert len(shard_files(tmp_path / "out")) == 1
    assert "note: only the val shard (5 tokens)" in capsys.readouterr().out


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["download", "streaming"])
def test_hub_offline_is_one_clear_line(tmp_path, streaming):
    out = tmp_path / "out"
    r = run_here("fineweb", "--out-dir", out, *streaming)  # HF_HUB_OFFLINE=1 (conftest)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert "hub" in line and "--data-files" in line
    assert not out.exists()


@pytest.mark.slow  # fresh interpreters
def test_import_has_no_side_effects_and_default_dir_is_beside_script(tmp_path):
    code = ("import sys, fineweb; "
            "print(sorted(m for m in ('tiktoken', 'datasets') if m in sys.modules), "
            "fineweb.encoder.cache_info().currsize)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["[]", "0"], r.stderr
    # run from elsewhere: the default --out-dir is edu_fineweb10B next to fineweb.py, not in the cwd
    data = write_jsonl(tmp_path / "c.jsonl", ["x"])
    r = subprocess.run([sys.executable, str(ROOT / "fineweb.py"), "--max-shards", "0",
                        "--data-files", str(data)], cwd=tmp_path, capture_output=True, text=True)
    assert str(ROOT / "edu_fineweb10B") in r.stdout + r.stderr


def test_bench_shards_are_shards_stage7_reads(tmp_path, enc):
    """benchmarks/make_bench_shards.py (timing stage 7 without FineWeb-Edu): fineweb.py's layout,
    tiny Shakespeare's tokens repeated, read by stage 7's loader."""
    out = tmp_path / "bench"
    r = run_here("benchmarks.make_bench_shards", "--out-dir", out, "--shard-size", "400000", "--val-size", "5000")
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in out.glob("*.npy"))
    assert shards == ["edufineweb_train_000001.npy", "edufineweb_train_000002.npy", "edufineweb_val_000000.npy"]
    text = enc.encode((ROOT / "input.txt").read_text(encoding="utf-8"))
    val = np.load(out / shards[2])
    assert val.dtype == np.uint16 and val[0] == 50256 and val[1:5000].tolist() == text[:4999]
    loader = importlib.import_module("7_train_ddp_fineweb").DataLoaderLite(str(out), "train", 4, 64, 0, 1)
    x, y = loader.next_batch()
    assert x.shape == (4, 64) and torch.equal(x.flatten()[1:], y.flatten()[:-1])


# ---------------------------------------------------------------------------------------------
# a full disk (ENOSPC) while a shard or the manifest is written


def full_disk_at_save(monkeypatch, nth):
    """np.save, as fineweb.py calls it, hits a full disk on its nth call, half-way into the file."""
    real, calls = np.save, []

    def save(f, arr, *args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            f.write(b"\x93NUMPY half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, arr, *args, **kwargs)
    monkeypatch.setattr(fineweb.np, "save", save)


@pytest.mark.slow  # over a second: the in-process tier stays within a minute
def test_full_disk_while_writing_a_shard(tmp_path, docs, monkeypatch):
    """One line naming the shard (with 2 workers running); the shards before it stay, listed in the
    manifest; no temporary file; the same command, with room again, ends where an uninterrupted
    run does."""
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    fw("--data-files", data, "--shard-size", 1500, "--out-dir", tmp_path / "full")
    out = tmp_path / "out"
    full_disk_at_save(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        fw("--data-files", data, "--shard-size", 1500, "--out-dir", out, workers=2)
    line = str(e.value.code)
    assert "\n" not in line and "edufineweb_train_000002.npy" in line, line
    assert os.strerror(errno.ENOSPC) in line
    assert [p.name for p in shard_files(out)] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert [s["file"] for s in json.loads((out / fineweb.MANIFEST).read_text())["shards"]] == \
        [p.name for p in shard_files(out)]
    assert not (out / fineweb.TMP).exists()
    monkeypatch.undo()
    fw("--data-files", data, "--shard-size", 1500, "--out-dir", out)
    assert shard_bytes(out) == shard_bytes(tmp_path / "full")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_while_writing_the_manifest(tmp_path, docs):
    """A real ENOSPC: the temporary file is a link to /dev/full, so the resumed run's first write,
    its manifest, fails. One line naming the manifest, no traceback, nothing complete touched."""
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    fw("--data-files", data, "--shard-size", 1500, "--out-dir", out, "--max-shards", 2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    os.symlink("/dev/full", out / fineweb.TMP)
    r = run_here("fineweb", "--data-files", data, "--shard-size", 1500, "--out-dir", out, "--workers", 1)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert str(out / fineweb.MANIFEST) in line and os.strerror(errno.ENOSPC) in line, line
    assert not os.path.lexists(out / fineweb.TMP)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# --download: the tokenised shards of kjj0/finewebedu10B-gpt2, from stand-ins for the hub


def bin_name(i):
    return f"finewebedu_{'val' if i == 0 else 'train'}_{i:06d}.bin"


def npy_name(i):
    return f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy"


def write_bin(path, tokens, magic=20240520, version=1, count=None):
    """An llm.c token file, as its dev/data/data_common.py writes one: 256 int32 (magic, version,
    token count, zeros), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def make_hub(folder, sizes, seed=0):
    """A folder standing in for the hub dataset: one .bin per shard (val first), random GPT-2
    ids with a document opening every 89 tokens. Returns each shard's tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for i, size in enumerate(sizes):
        tokens = rng.integers(0, EOT, size=size).astype(np.uint16)
        tokens[::89] = EOT
        write_bin(folder / bin_name(i), tokens)
        shards.append(tokens)
    return shards


def npy_bytes(tokens):
    buf = io.BytesIO()
    np.save(buf, tokens)
    return buf.getvalue()


def stand_in(monkeypatch, hub, interrupt_at=None):
    """fineweb.hub_download as the hub client does it: the file into local_dir, its path back.
    Returns the names fetched, each with the .bin files already in local_dir when it was asked
    for. interrupt_at: Ctrl-C while that file comes, leaving a partial file behind (as clients
    that resume across runs keep one)."""
    fetched = []

    def fetch(filename, local_dir):
        fetched.append((filename, sorted(p.name for p in local_dir.glob("*.bin"))))
        partial = local_dir / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        if filename == interrupt_at:
            partial.write_bytes((hub / filename).read_bytes()[:1500])
            raise KeyboardInterrupt
        shutil.copyfile(hub / filename, partial)
        partial.replace(local_dir / filename)
        return local_dir / filename
    monkeypatch.setattr(fineweb, "hub_download", fetch)
    return fetched


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(folder, tokens): a 5-file stand-in for the hub dataset; fineweb.py takes it as complete."""
    monkeypatch.setattr(fineweb, "TOKENS_FILES", 5)
    folder = tmp_path / "hub"
    return folder, make_hub(folder, [3001, 4000, 4000, 4000, 2345])


def test_download_writes_the_tokens_as_shards(tmp_path, hub, monkeypatch, capsys):
    """--max-shards 3: val + 2 train shards, each the bytes np.save writes for that .bin's tokens,
    the source in the manifest, no .bin left. Run again: only the missing shards are fetched, the
    first three stay as they are, the manifest says done; once more: nothing to do."""
    folder, tokens = hub
    out = tmp_path / "out"
    fetched = stand_in(monkeypatch, folder)
    fw("--download", "--max-shards", 3, "--out-dir", out)
    assert fetched == [(bin_name(i), []) for i in range(3)]  # one .bin on disk at a time
    assert shard_bytes(out) == {npy_name(i): npy_bytes(tokens[i]) for i in range(3)}
    manifest = json.loads((out / fineweb.MANIFEST).read_text())
    assert manifest["source"] == {"dataset": "kjj0/finewebedu10B-gpt2"} and not manifest["done"]
    assert [s["tokens"] for s in manifest["shards"]] == [len(t) for t in tokens[:3]]
    assert sorted(p.name for p in out.iterdir()) == sorted([fineweb.MANIFEST, *map(npy_name, range(3))])

    first = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    fetched.clear()
    fw("--download", "--out-dir", out)
    assert fetched == [(bin_name(3), []), (bin_name(4), [])]
    assert shard_bytes(out) == {npy_name(i): npy_bytes(t) for i, t in enumerate(tokens)}
    assert all(first[n] == (out / n).stat().st_mtime_ns for n in first)  # not written again
    assert json.loads((out / fineweb.MANIFEST).read_text())["done"]
    assert not list(out.rglob("*.bin")) and not (out / fineweb.DOWNLOAD_DIR).exists()
    fetched.clear()
    capsys.readouterr()
    fw("--download", "--out-dir", out)
    assert fetched == [] and "nothing to do" in capsys.readouterr().out


def test_download_full_disk_while_writing_a_shard(tmp_path, hub, monkeypatch):
    """A full disk while a downloaded shard is written: one line naming it, the shards before it
    stay, its .bin stays for the rerun (the hub client hands back a complete local file), no
    temporary file; with room again the same command ends with every shard."""
    folder, tokens = hub
    out = tmp_path / "out"
    stand_in(monkeypatch, folder)
    full_disk_at_save(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        fw("--download", "--out-dir", out)
    line = str(e.value.code)
    assert "\n" not in line and npy_name(1) in line and os.strerror(errno.ENOSPC) in line, line
    assert shard_bytes(out) == {npy_name(0): npy_bytes(tokens[0])}
    assert (out / fineweb.DOWNLOAD_DIR / bin_name(1)).exists() and not (out / fineweb.TMP).exists()
    monkeypatch.undo()  # room again (and the hub fixture's setting, made again)
    monkeypatch.setattr(fineweb, "TOKENS_FILES", 5)
    stand_in(monkeypatch, folder)
    fw("--download", "--out-dir", out)
    assert shard_bytes(out) == {npy_name(i): npy_bytes(t) for i, t in enumerate(tokens)}


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "too-long", "no-header",
                                    "not-gpt2-ids"])
def test_download_damaged_file_is_one_line(tmp_path, hub, monkeypatch, damage):
    """A .bin whose header is wrong or whose payload is not the header's token count: one line
    naming the file, nothing written for it (the shards before it stay), the bad .bin deleted,
    so the same command fetches it afresh once the hub has it right."""
    folder, tokens = hub
    path, t = folder / bin_name(2), tokens[2]
    raw = path.read_bytes()
    if damage == "magic":
        write_bin(path, t, magic=20240522)  # llm.c's eval-file magic
    elif damage == "version":
        write_bin(path, t, version=7)  # llm.c's llama-3 version (uint32 tokens)
    elif damage == "truncated":
        path.write_bytes(raw[:-2])
    elif damage == "too-long":
        path.write_bytes(raw + b"\0\0")
    elif damage == "no-header":
        path.write_bytes(raw[:1000])
    else:
        write_bin(path, np.concatenate([t[:-1], [50257]]).astype(np.uint16))
    stand_in(monkeypatch, folder)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        fw("--download", "--out-dir", out)
    line = str(e.value.code)
    assert line.startswith("fineweb.py: error: ") and "\n" not in line and bin_name(2) in line, line
    assert shard_bytes(out) == {npy_name(i): npy_bytes(tokens[i]) for i in range(2)}
    assert len(json.loads((out / fineweb.MANIFEST).read_text())["shards"]) == 2
    assert not list(out.rglob("*.bin")) and not (out / fineweb.TMP).exists()

    write_bin(path, t)  # repaired upstream
    fw("--download", "--out-dir", out)
    assert shard_bytes(out) == {npy_name(i): npy_bytes(t) for i, t in enumerate(tokens)}


def test_download_interrupted_then_run_again(tmp_path, hub, monkeypatch):
    """Ctrl-C while shard 3 downloads, and (the worst case) the manifest one shard behind the disk:
    the same command fetches from the first shard the manifest lacks, keeps the client's partial
    file for it until then, and ends with the bytes of an uninterrupted run."""
    folder, tokens = hub
    out = tmp_path / "out"
    stand_in(monkeypatch, folder, interrupt_at=bin_name(3))
    with pytest.raises(SystemExit) as e:
        fw("--download", "--out-dir", out)
    assert "interrupted" in str(e.value.code)
    assert [p.name for p in shard_files(out)] == [npy_name(i) for i in range(3)]
    assert list((out / fineweb.DOWNLOAD_DIR).rglob("*.incomplete"))  # left for the client to resume
    manifest = json.loads((out / fineweb.MANIFEST).read_text())
    assert len(manifest["shards"]) == 3 and not (out / fineweb.TMP).exists()
    manifest["shards"].pop()  # as if the crash came after shard 2's rename, before its manifest entry
    (out / fineweb.MANIFEST).write_text(json.dumps(manifest))

    fetched = stand_in(monkeypatch, folder)
    fw("--download", "--out-dir", out)
    assert [name for name, _ in fetched] == [bin_name(i) for i in (2, 3, 4)]
    assert shard_bytes(out) == {npy_name(i): npy_bytes(t) for i, t in enumerate(tokens)}
    assert not (out / fineweb.DOWNLOAD_DIR).exists()


def test_download_and_tokenised_shards_never_mix(tmp_path, hub, docs, monkeypatch):
    """An out-dir of tokenised shards (from local files, from the hub's text, or without a
    manifest) refuses --download, one of downloaded shards refuses the tokeniser, each in one line
    and untouched; --overwrite starts the other kind afresh."""
    folder, tokens = hub
    stand_in(monkeypatch, folder)
    data = write_jsonl(tmp_path / "c.jsonl", docs)
    tokenised, downloaded = tmp_path / "tokenised", tmp_path / "downloaded"
    fw("--data-files", data, "--shard-size", 3000, "--out-dir", tokenised)
    fw("--download", "--max-shards", 2, "--out-dir", downloaded)
    hub_text, no_manifest = tmp_path / "hub_text", tmp_path / "no_manifest"
    for out in (hub_text, no_manifest):
        shutil.copytree(tokenised, out)
    manifest = json.loads((hub_text / fineweb.MANIFEST).read_text())
    manifest.update(source={"dataset": "HuggingFaceFW/fineweb-edu/sample-10BT", "text_field": "text"},
                    shard_size=10**8)  # what plain `python fineweb.py` records
    (hub_text / fineweb.MANIFEST).write_text(json.dumps(manifest))
    (no_manifest / fineweb.MANIFEST).unlink()  # shards without a manifest: the lecture's own, say
    for args, out in ((["--download"], tokenised), (["--download"], hub_text), (["--download"], no_manifest),
                      (["--data-files", data, "--shard-size", 3000], downloaded),
                      (["--data-files", data], downloaded)):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(SystemExit) as e:
            fw(*args, "--out-dir", out)
        assert "--overwrite" in str(e.value.code) and "\n" not in str(e.value.code)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fw("--download", "--max-shards", 2, "--out-dir", tokenised, "--overwrite")
    assert shard_bytes(tokenised) == shard_bytes(downloaded)
    with pytest.raises(SystemExit) as e:
        fw("--download", "--shard-size", 3000, "--out-dir", tmp_path / "other")
    assert "--shard-size" in str(e.value.code) and not (tmp_path / "other").exists()


@pytest.mark.parametrize("error", ["LocalEntryNotFoundError", "OfflineModeIsEnabled",
                                   "requests.ConnectionError", "ConnectionError", "ENOSPC",
                                   "ConnectionError-with-partial"])
def test_download_failure_is_one_line(tmp_path, monkeypatch, error):
    """Whatever the hub client raises (its offline errors, a requests or a builtin connection
    error, a full disk while it writes): one line that names the dataset and the other way; the
    out-dir this run made is gone again, unless it holds a partial download to resume."""
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    exc = {"LocalEntryNotFoundError": LocalEntryNotFoundError("cannot find the requested files"),
           "OfflineModeIsEnabled": OfflineModeIsEnabled("offline mode is enabled"),
           "requests.ConnectionError": requests.ConnectionError("Max retries exceeded"),
           "ENOSPC": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}.get(
               error, ConnectionError("Connection reset by peer"))
    partial = tmp_path / "out" / fineweb.DOWNLOAD_DIR / ".cache" / f"{bin_name(0)}.incomplete"

    def fetch(filename, local_dir):
        (local_dir / ".cache").mkdir(parents=True)  # as the client makes it
        if error.endswith("partial"):
            partial.write_bytes(b"the first bytes")
        raise exc
    monkeypatch.setattr(fineweb, "hub_download", fetch)
    with pytest.raises(SystemExit) as e:
        fw("--download", "--out-dir", tmp_path / "out")
    line = str(e.value.code)
    assert "\n" not in line and "kjj0/finewebedu10B-gpt2" in line and type(exc).__name__ in line
    assert "`python fineweb.py`" in line and "HF_ENDPOINT" in line
    assert partial.exists() if error.endswith("partial") else not (tmp_path / "out").exists()


def test_download_offline_is_one_line(tmp_path):
    """The real hub client, offline (HF_HUB_OFFLINE=1, as in this workplace)."""
    out = tmp_path / "out"
    r = run_here("fineweb", "--download", "--out-dir", out)  # HF_HUB_OFFLINE=1 (conftest)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert "kjj0/finewebedu10B-gpt2" in line and "finewebedu_val_000000.bin" in line
    assert "`python fineweb.py`" in line
    assert not out.exists()


def serve_hub(folder, drop_first_get_of=None):
    """A local HTTP server that answers the hub client as an HF_ENDPOINT mirror does: HEAD and GET
    (with Range) of /datasets/{repo}/resolve/main/{file}. The first GET of `drop_first_get_of`
    breaks off 1 MB before the end. Returns (server, requests seen as (method, file, Range))."""
    prefix, seen = f"/datasets/{fineweb.TOKENS_REPO}/resolve/main/", []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, method):
            name = self.path[len(prefix):] if self.path.startswith(prefix) else ""
            if name:  # (the client also asks the endpoint for other things: not found here)
                seen.append((method, name, self.headers.get("Range")))
            path = folder / name
            if not name or not path.is_file():
                self.send_response(404)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            data = path.read_bytes()
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if method == "GET":
                drop = name == drop_first_get_of and [m for m, n, _ in seen if n == name].count("GET") == 1
                self.wfile.write(data[start:-10**6] if drop else data[start:])

        def do_HEAD(self):
            self.reply("HEAD")

        def do_GET(self):
            self.reply("GET")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.slow
def test_download_through_hf_endpoint_mirror_then_stage7_trains(tmp_path):
    """`python fineweb.py --download --max-shards 3` through the real hub client pointed at a local
    mirror by HF_ENDPOINT: a download broken off near its end resumes (a Range request: the client
    keeps what it has in 10 MB chunks, so shard 1 is 12 MB), the shards are the .bin files' tokens,
    no .bin is left and the hub cache (HF_HOME) holds no copy; then stage 7 trains on them."""
    tokens = make_hub(tmp_path / "hub", [3001, 6_000_000, 4099])
    server, seen = serve_hub(tmp_path / "hub", drop_first_get_of=bin_name(1))
    out, hf_home = tmp_path / "shards", tmp_path / "hf_home"
    try:
        r = run_script("fineweb", "--download", "--max-shards", 3, "--out-dir", out,
                       env={"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
                            "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"})
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stdout + r.stderr
    gets = [(n, rng) for m, n, rng in seen if m == "GET"]
    assert [n for n, _ in gets] == [bin_name(0), bin_name(1), bin_name(1), bin_name(2)]
    assert gets[2][1] is not None and gets[2][1].startswith("bytes=")  # resumed, not restarted
    assert shard_bytes(out) == {npy_name(i): npy_bytes(t) for i, t in enumerate(tokens)}
    assert sorted(p.name for p in out.iterdir()) == sorted([fineweb.MANIFEST, *map(npy_name, range(3))])
    assert not [p for p in hf_home.rglob("*") if p.is_file() and p.stat().st_size > 1000]

    _, rows = run7("--data-dir", out, "--log-dir", tmp_path / "log", "--steps", "1")
    assert [r["step"] for r in rows] == [0] and 10 < rows[0]["loss"] < 11.5  # ~ln(50257) at init
