"""fineweb.py on a small local corpus: the shard contract (DESIGN.md, contract 4), byte-identity
with the lecture's loop, every input format, resume after an interruption, clear errors."""
import importlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script

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
    """fineweb.main in this process (workers=1: no Pool, fast); an error raises SystemExit."""
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
    r = run_script("fineweb", "--data-files", data, "--shard-size", size, "--out-dir", out,
                   "--workers", 2)
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
    r = run_script("fineweb", "--data-files", *bad, "--shard-size", 3000, "--out-dir", out,
                   "--workers", 2)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert {"missing-file": "nope.jsonl", "extension": "c.csv",
            "no-text-field": "record 1 has no string field 'text'"}[case] in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["download", "streaming"])
def test_hub_offline_is_one_clear_line(tmp_path, streaming):
    out = tmp_path / "out"
    r = run_script("fineweb", "--out-dir", out, *streaming,
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert "hub" in line and "--data-files" in line
    assert not out.exists()


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
    r = run_script("make_bench_shards", "--out-dir", out, "--shard-size", "400000", "--val-size", "5000",
                   cmd=[sys.executable, str(ROOT / "benchmarks" / "make_bench_shards.py")])
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in out.glob("*.npy"))
    assert shards == ["edufineweb_train_000001.npy", "edufineweb_train_000002.npy", "edufineweb_val_000000.npy"]
    text = enc.encode((ROOT / "input.txt").read_text(encoding="utf-8"))
    val = np.load(out / shards[2])
    assert val.dtype == np.uint16 and val[0] == 50256 and val[1:5000].tolist() == text[:4999]
    loader = importlib.import_module("7_train_ddp_fineweb").DataLoaderLite(str(out), "train", 4, 64, 0, 1)
    x, y = loader.next_batch()
    assert x.shape == (4, 64) and torch.equal(x.flatten()[1:], y.flatten()[:-1])
