"""Pre-tokenized corpora: the token file holds exactly kowikitext's tokens, the builder serves
exactly its windows and packs, a killed run resumes to the same bytes, bad input is refused."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchtune.datasets import ConcatDataset, PackedDataset

from kobllla import pretokenized as pt
from kobllla.assets import llama3_tokenizer_model_path
from kobllla.corpora import korean_documents, write_text_csv
from kobllla.datasets import kowikitext_dataset
from kobllla.datasets._ko_wiki import tokenize_documents
from kobllla.datasets._pretokenized import pack_bounds, pack_runs, pretokenized_dataset, window_bounds, window_index
from kobllla.datasets._sources import iter_rows
from kobllla.datasets._windows import document_windows, pack_windows
from tests.conftest import REPO
from tools.pretokenize import main as pretokenize_main

BOS, EOS = 128000, 128001
# "대한민국은 민주공화국이다." through Meta's Llama 3 tokenizer.model.
ARTICLE_1_IDS = [113760, 108709, 34804, 127444, 79225, 57390, 100654, 101568, 13]
TOKENIZER = llama3_tokenizer_model_path()


def build(tmp: Path, source: Path, name: str = "out", **kw) -> Path:
    out = tmp / name
    kw.setdefault("workers", 1)
    pt.pretokenize(source=str(source), out_dir=out, tokenizer_path=TOKENIZER, progress=False, **kw)
    return out


def file_bytes(out: Path) -> tuple[bytes, bytes]:
    return (out / pt.TOKENS_FILE).read_bytes(), (out / pt.ENDS_FILE).read_bytes()


@pytest.fixture(scope="module")
def ko_csv(tmp_path_factory) -> Path:
    """konlpy's 147 Korean documents (Constitution articles + bills), one row each."""
    return write_text_csv(tmp_path_factory.mktemp("ko") / "ko.csv", korean_documents())


@pytest.fixture(scope="module")
def ko_tokens(ko_csv) -> Path:
    """ko.csv pre-tokenized on 2 worker processes, 10 rows a task (15 tasks, in order)."""
    return build(ko_csv.parent, ko_csv, "ko.tokens", workers=2, chunk_rows=10)


# ---------------------------------------------------------------- the token file


def test_short_article_is_bos_text_eos_in_a_uint32_file(tmp_path):
    f = tmp_path / "one.csv"
    f.write_text("text\n대한민국은 민주공화국이다.\n", encoding="utf-8")
    out = build(tmp_path, f)
    assert np.fromfile(out / pt.TOKENS_FILE, dtype="<u4").tolist() == [BOS, *ARTICLE_1_IDS, EOS]
    assert np.fromfile(out / pt.ENDS_FILE, dtype="<i8").tolist() == [11]
    manifest = json.loads((out / pt.MANIFEST).read_text())
    assert manifest["counts"] == {"rows": 1, "documents": 1, "skipped_empty": 0, "tokens": 11}
    assert manifest["tokenizer"]["sha256"].startswith("82e9d319")


def test_token_file_equals_kowikitext_tokenization_with_empty_rows_counted(ko_tokens, ko_csv, assets, llama3_tok,
                                                                          tmp_path):
    for source, out in ((ko_csv, ko_tokens), (assets / "kowiki_tiny.csv", build(tmp_path, assets / "kowiki_tiny.csv"))):
        rows = lambda s=source: iter_rows(str(s))  # noqa: E731
        tokens, ends, stats = tokenize_documents(rows, llama3_tok, column="text", filter_fn=None)
        assert np.fromfile(out / pt.TOKENS_FILE, dtype="<u4").tolist() == tokens.tolist()
        assert np.fromfile(out / pt.ENDS_FILE, dtype="<i8").tolist() == ends.tolist()
        counts = json.loads((out / pt.MANIFEST).read_text())["counts"]
        assert counts == {"rows": stats.rows, "documents": stats.documents, "skipped_empty": stats.skipped_empty,
                          "tokens": stats.tokens}
    assert counts == {"rows": 5, "documents": 3, "skipped_empty": 2, "tokens": 227}  # kowiki_tiny.csv


def test_output_bytes_do_not_depend_on_workers_or_chunk_size(ko_tokens, ko_csv, tmp_path):
    assert file_bytes(build(tmp_path, ko_csv, workers=1, chunk_rows=7)) == file_bytes(ko_tokens)


# ---------------------------------------------------------------- the index


def test_index_equals_pack_windows_and_document_windows_on_random_streams():
    rng = np.random.default_rng(0)
    runs_seen = 0
    for _ in range(400):
        max_len = int(rng.integers(2, 9))
        ends = np.cumsum(rng.integers(2, 3 * max_len, size=int(rng.integers(1, 40))))
        run_starts, first_pack = pack_runs(ends, max_len)
        packs = [pack_bounds(run_starts, first_pack, int(ends[-1]), max_len, i) for i in range(int(first_pack[-1]))]
        assert packs == pack_windows(ends.tolist(), max_len)
        runs_seen += len(run_starts) - 1  # packs that ended exactly on a document end
        first_window = window_index(ends, max_len)
        windows = [window_bounds(ends, first_window, max_len, i) for i in range(int(first_window[-1]))]
        starts = [0, *ends[:-1].tolist()]
        expected = [w for s, e in zip(starts, ends.tolist(), strict=True) for w in document_windows(s, e, max_len)]
        assert windows == expected
    assert runs_seen > 100  # the boundary-hit rule was exercised, not just the even stride


def test_documents_of_exactly_max_seq_len_make_one_run_per_document():
    ends = np.arange(1, 100_001) * 8
    run_starts, first_pack = pack_runs(ends, 8)
    assert len(run_starts) == 100_000 and int(first_pack[-1]) == 100_000
    assert pack_bounds(run_starts, first_pack, 800_000, 8, 99_999) == (799_992, 800_000)


# ---------------------------------------------------------------- the dataset


@pytest.mark.parametrize("max_seq_len", [8, 37, 128, 4096])
def test_packs_equal_packed_text_dataset_for_the_same_rows(ko_tokens, ko_csv, llama3_tok, max_seq_len):
    ours = pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=max_seq_len, packed=True)
    theirs = kowikitext_dataset(llama3_tok, source=str(ko_csv), max_seq_len=max_seq_len, packed=True)
    assert isinstance(ours, PackedDataset)
    assert len(ours) == len(theirs) == theirs.stats.samples == ours.stats.samples
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert a.keys() == b.keys() == {"tokens", "labels", "input_pos", "seq_lens"}
        for key in a:
            assert torch.equal(a[key], b[key]), f"pack {i} {key}"


@pytest.mark.parametrize("max_seq_len", [8, 128])
def test_windows_equal_text_window_dataset_for_the_same_rows(ko_tokens, ko_csv, llama3_tok, max_seq_len):
    ours = pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=max_seq_len)
    theirs = kowikitext_dataset(llama3_tok, source=str(ko_csv), max_seq_len=max_seq_len)
    assert [ours[i] for i in range(len(ours))] == [theirs[i] for i in range(len(theirs))]
    assert ours[-1] == theirs[len(theirs) - 1]
    with pytest.raises(IndexError, match="out of range"):
        ours[len(ours)]


def test_window_length_defaults_to_the_tokenizers_max_seq_len(ko_tokens):
    from tests.conftest import make_llama3_tokenizer

    ds = pretokenized_dataset(make_llama3_tokenizer(max_seq_len=64), path=str(ko_tokens), packed=True)
    assert ds[0]["tokens"].shape == (64,)


def test_packed_mixes_with_kowikitext_packs_in_a_concat_dataset(ko_tokens, assets, llama3_tok):
    mixed = ConcatDataset([
        pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=32, packed=True),
        kowikitext_dataset(llama3_tok, source=str(assets / "kowiki_tiny.csv"), max_seq_len=32, packed=True),
    ])
    assert mixed.packed is True
    assert mixed[len(mixed) - 1]["tokens"].shape == (32,)


def test_each_rank_gets_a_disjoint_share_in_the_same_order_on_every_run(ko_tokens, llama3_tok):
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    def shares(epoch: int) -> list[list[int]]:
        ds = pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=16, packed=True)
        out = []
        for rank in (0, 1):  # as lora_finetune_distributed builds it, shuffle: True
            sampler = StatefulDistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True)
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    n = len(pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=16, packed=True))
    rank0, rank1 = shares(0)
    assert len(rank0) == len(rank1) == (n + 1) // 2
    assert set(rank0) | set(rank1) == set(range(n))
    assert len(set(rank0) & set(rank1)) == (n % 2)  # the sampler pads an odd count with one repeat
    assert shares(0) == [rank0, rank1] and shares(1) != [rank0, rank1]


def test_pickling_reopens_the_file_instead_of_copying_the_tokens(ko_tokens, llama3_tok):
    ds = pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=16, packed=True)
    blob = pickle.dumps(ds)
    assert len(blob) < (ko_tokens / pt.TOKENS_FILE).stat().st_size // 10
    again = pickle.loads(blob)
    assert all(torch.equal(again[7][k], ds[7][k]) for k in ds[7])


# ---------------------------------------------------------------- atomic and resumable output


def test_interrupted_run_resumes_to_the_same_bytes(ko_tokens, ko_csv, tmp_path, monkeypatch):
    real, calls = pt._encode_chunk, []

    def interrupted(texts):
        calls.append(len(texts))
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) during the 4th chunk
        return real(texts)

    monkeypatch.setattr(pt, "_encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, ko_csv, chunk_rows=10)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    assert not out.exists()
    progress = json.loads((partial / pt.PROGRESS).read_text())
    assert progress["rows"] == 30 and progress["documents"] == 30
    with open(partial / pt.TOKENS_FILE, "ab") as f:
        f.write(b"\x01\x02\x03\x04\x05\x06")  # bytes of a chunk that was never committed
    with pytest.raises(FileNotFoundError, match=r"unfinished run is in .*\.out\.partial: rerun the same pretokenize"):
        pt.open_pretokenized(out)
    monkeypatch.setattr(pt, "_encode_chunk", real)
    calls.clear()
    build(tmp_path, ko_csv, chunk_rows=10)
    assert file_bytes(out) == file_bytes(ko_tokens)
    assert json.loads((out / pt.MANIFEST).read_text())["settings"]["resumed_at_row"] == 30
    assert not partial.exists()


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_cli_leaves_no_workers_and_resumes_to_the_same_bytes(tmp_path):
    corpus = write_text_csv(tmp_path / "ko.csv", korean_documents(), repeat=30)  # ~1.1 M tokens
    args = ["--source", str(corpus), "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "out"),
            "--workers", "2", "--chunk-rows", "64", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "tools.pretokenize", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / ".out.partial" / pt.PROGRESS
    workers: list[int] = []
    while proc.poll() is None and not (progress.is_file() and json.loads(progress.read_text())["rows"] > 0):
        workers = children_of(proc.pid) or workers
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    workers = children_of(proc.pid) or workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    orphans = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in orphans:  # do not leave them behind when this fails
        os.kill(w, signal.SIGKILL)
    assert len(workers) == 2 and orphans == []
    assert not (tmp_path / "out").exists()
    assert pretokenize_main(args) == 0
    resumed = json.loads((tmp_path / "out" / pt.MANIFEST).read_text())["settings"]["resumed_at_row"]
    assert resumed > 0 and resumed % 64 == 0
    assert file_bytes(tmp_path / "out") == file_bytes(build(tmp_path, corpus, "reference", workers=2))


def test_partial_run_of_other_input_is_started_over(ko_csv, assets, tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "_encode_chunk", lambda texts: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, ko_csv)
    monkeypatch.undo()
    out = build(tmp_path, assets / "kowiki_tiny.csv")
    manifest = json.loads((out / pt.MANIFEST).read_text())
    assert manifest["settings"]["resumed_at_row"] == 0 and manifest["counts"]["rows"] == 5


def test_a_second_writer_of_the_same_output_is_refused(assets, tmp_path):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / pt.OWNER).write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(RuntimeError, match=rf"another pretokenize \(pid {os.getppid()}\) is writing this output"):
        build(tmp_path, assets / "kowiki_tiny.csv")
    assert sorted(p.name for p in partial.iterdir()) == [pt.OWNER]


def test_existing_output_is_refused_unless_overwrite(ko_csv, assets, tmp_path):
    out = build(tmp_path, assets / "kowiki_tiny.csv")
    with pytest.raises(FileExistsError, match="already exists; pick another --out or pass --overwrite"):
        build(tmp_path, ko_csv)
    build(tmp_path, ko_csv, overwrite=True)
    assert json.loads((out / pt.MANIFEST).read_text())["counts"]["rows"] == 147


# ---------------------------------------------------------------- bad input


def assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []


def test_missing_column_names_file_row_and_columns(tmp_path):
    f = tmp_path / "wiki.csv"
    f.write_text("title,body\n제목,본문\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"wiki\.csv line 2: no field 'text' \(fields: body, title\); pass --column NAME"
    ):
        build(tmp_path, f)
    assert_nothing_written(tmp_path)


def test_non_text_field_names_the_row(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "가나다"}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl line 2: field 'text' is int, expected text"):
        build(tmp_path, f, chunk_rows=1)
    assert_nothing_written(tmp_path)


def test_only_empty_rows_is_refused(tmp_path):
    f = tmp_path / "empty.csv"
    f.write_text('text\n""\n"  "\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no text to tokenize: 2 rows read, 2 empty"):
        build(tmp_path, f)
    assert_nothing_written(tmp_path)


def test_missing_input_and_tokenizer_files_are_named(tmp_path, assets):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file"):
        pt.pretokenize(source="csv", data_files=str(tmp_path / "nope.csv"), out_dir=tmp_path / "out",
                       tokenizer_path=TOKENIZER, progress=False)
    with pytest.raises(FileNotFoundError, match=r"tok\.model: no tokenizer file; pass --tokenizer"):
        pt.pretokenize(source=str(assets / "kowiki_tiny.csv"), out_dir=tmp_path / "out",
                       tokenizer_path=tmp_path / "tok.model", progress=False)
    (tmp_path / "tok.model").write_text("not base64 ranks\n")
    with pytest.raises(ValueError, match=r"tok\.model: not a Llama 3 tiktoken tokenizer\.model"):
        pt.pretokenize(source=str(assets / "kowiki_tiny.csv"), out_dir=tmp_path / "out",
                       tokenizer_path=tmp_path / "tok.model", progress=False)
    assert_nothing_written(tmp_path)


def test_builder_refuses_a_missing_or_truncated_corpus(ko_tokens, llama3_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no pretokenized corpus here; make one with python -m tools"):
        pretokenized_dataset(llama3_tok, path=str(tmp_path / "nowhere"), max_seq_len=8)
    cut = tmp_path / "cut"
    cut.mkdir()
    with pytest.raises(ValueError, match=r"cut: no manifest\.json, so not a complete pretokenized corpus; rebuild it"):
        pretokenized_dataset(llama3_tok, path=str(cut), max_seq_len=8)
    for name in (pt.TOKENS_FILE, pt.ENDS_FILE, pt.MANIFEST):
        (cut / name).write_bytes((ko_tokens / name).read_bytes())
    with open(cut / pt.TOKENS_FILE, "r+b") as f:
        f.truncate(400)
    with pytest.raises(ValueError, match=r"tokens\.uint32\.bin: 400 bytes, the manifest says \d+ x 4-byte values"):
        pretokenized_dataset(llama3_tok, path=str(cut), max_seq_len=8)


def test_builder_refuses_a_different_tokenizer(ko_tokens, tmp_path):
    from torchtune.models.llama3 import llama3_tokenizer

    ranks = TOKENIZER.read_text().splitlines()[:5000]  # a smaller BPE: same special ids, other merges
    (tmp_path / "small.model").write_text("\n".join(ranks) + "\n")
    with pytest.raises(ValueError, match="encodes the manifest's probe text differently"):
        pretokenized_dataset(llama3_tokenizer(str(tmp_path / "small.model")), path=str(ko_tokens), max_seq_len=8)


def test_builder_refuses_a_window_that_cannot_hold_a_target(ko_tokens, llama3_tok):
    with pytest.raises(ValueError, match="needs a window length: set tokenizer.max_seq_len or dataset.max_seq_len"):
        pretokenized_dataset(llama3_tok, path=str(ko_tokens))
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        pretokenized_dataset(llama3_tok, path=str(ko_tokens), max_seq_len=1)


def test_cli_prints_counts_or_one_line_error(assets, tmp_path, capsys):
    args = ["--source", "csv", "--data-files", str(assets / "kowiki_tiny.csv"), "--tokenizer", str(TOKENIZER),
            "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    assert pretokenize_main(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / pt.MANIFEST).is_file()
    assert pretokenize_main([*args[:-4], str(tmp_path / "out2"), "--column", "body", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: kowiki_tiny.csv line 2: no field 'body' (fields: text)")
    assert not (tmp_path / "out2").exists() and not (tmp_path / ".out2.partial").exists()


# ---------------------------------------------------------------- the stock recipe


@pytest.mark.integration
def test_stock_recipe_trains_from_the_pretokenized_config(tmp_path, tiny_base):
    corpus = write_text_csv(tmp_path / "ko.csv", korean_documents()[:12], repeat=6)
    tokens = build(tmp_path, corpus, "ko.tokens")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tools.tune_cpu", "--nproc_per_node", "2", "lora_finetune_distributed",
           "--config", "configs/tiny/stage1_pretokenized_lora.yaml", f"output_dir={out}",
           f"checkpointer.checkpoint_dir={tiny_base}", f"tokenizer.path={tiny_base}/original/tokenizer.model",
           f"dataset.path={tokens}", "max_steps_per_epoch=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = "".join(f.read_text() for f in (out / "logs").glob("*.txt"))
    assert "Step 1 | loss:" in logs and "Step 2 | loss:" in logs
    assert (out / "epoch_0" / "adapter_model.safetensors").is_file()
