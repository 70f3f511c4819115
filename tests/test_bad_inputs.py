"""Issue 16's bad inputs, each run as a user runs it: ``python -m TOOL`` in a subprocess on real files.

Every case asserts the exit status (2 for bad input, 1 where a run fails), one ``error:`` line
(the last line of stderr) matching the message, no traceback, inputs byte-identical and nothing
at the output path. The light tools start in well under a second; the ones that import torch
(pretokenize, eval.run) take ~5-10 s each, so their cases are grouped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._chat_server_fixture import FakeChatServer
from tests._wikidump_fixture import WikiPage, write_dump

REPO = Path(__file__).resolve().parent.parent
TORCHAO_NOTICE = "Skipping import of cpp extensions due to incompatible torch version"  # README explains it


def cli(module: str, *args: object, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def refused(proc: subprocess.CompletedProcess, match: str, code: int = 2) -> str:
    """Asserts the exit status and a single ``error:`` line (the last line) matching ``match``; returns it."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert [ln for ln in lines[:-1] if TORCHAO_NOTICE not in ln and not ln.startswith("warning: ")] == []
    assert re.search(match, lines[-1]), lines[-1]
    return lines[-1]


def snapshot(*paths: Path) -> dict[Path, bytes]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f: f.read_bytes() for f in files if f.is_file()}


def write_jsonl(path: Path, rows: list[dict | None]) -> Path:
    """One JSON object a line; ``None`` writes a blank line (which still counts as a line)."""
    path.write_text("".join("\n" if r is None else json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def lima(n: int, script: dict[int, str] | None = None) -> list[dict]:
    rows = [{"conversations": [f"Question {i}?", f"Answer {i}."]} for i in range(n)]
    for i, s in (script or {}).items():
        rows[i]["conversations"][0] += f" [[script: {s}]]"
    return rows


def translate(src: Path, out: Path, base_url: str, *extra: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return cli("tools.translate_dataset", "--input", src, "--output", out, "--base-url", base_url, "--model", "m",
               "--no-progress", *extra, timeout=timeout)


# ---------------------------------------------------------------- 1: an output over its own input


def test_translate_refuses_an_output_that_is_or_points_at_its_input(tmp_path):
    src = write_jsonl(tmp_path / "lima.jsonl", lima(3))
    (tmp_path / "link.jsonl").symlink_to(src)
    (tmp_path / "outdir").mkdir()
    before = snapshot(tmp_path)
    for out in (src, tmp_path / "link.jsonl"):
        refused(translate(src, out, "http://127.0.0.1:9/v1"),
                rf"^error: output {re.escape(str(out))} would overwrite or replace input .*lima.jsonl; inputs are "
                r"never modified: pick an output path outside every input$")
    refused(translate(src, tmp_path / "outdir", "http://127.0.0.1:9/v1"),
            r"^error: --output .*outdir is a directory; pass a file such as .*outdir/kolima.jsonl$")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "lima.jsonl", "link.jsonl", "outdir"]


# ---------------------------------------------------------------- 2: what retrying cannot change, a dead endpoint


def test_translate_stops_at_once_on_a_url_without_scheme_or_nothing_listening(tmp_path):
    src = write_jsonl(tmp_path / "lima.jsonl", lima(40))
    out = tmp_path / "kolima.jsonl"
    refused(translate(src, out, "localhost:8000"),
            r"^error: --base-url 'localhost:8000' is not an http:// or https:// URL; pass e.g. http://localhost:8000/v1$")
    start = time.monotonic()
    refused(translate(src, out, "http://127.0.0.1:9/v1"),
            r"^error: cannot connect to http://127.0.0.1:9/v1/chat/completions: connection refused; start the server")
    assert time.monotonic() - start < 20  # was 40 rows x ~48 s of retries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lima.jsonl"]


def test_translate_writes_each_failed_row_to_the_errors_file_when_it_fails(tmp_path):
    src = write_jsonl(tmp_path / "lima.jsonl", lima(4, {0: "400", 1: "400", 2: "400", 3: "sleep=60"}))
    out, errors = tmp_path / "kolima.jsonl", tmp_path / "kolima.jsonl.errors.jsonl"
    with FakeChatServer() as server:
        cmd = [sys.executable, "-m", "tools.translate_dataset", "--input", str(src), "--output", str(out),
               "--base-url", server.base_url, "--model", "m", "--concurrency", "4", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not errors.exists() or errors.read_text().count("\n") < 3):
                time.sleep(0.05)
            assert proc.poll() is None  # the run is still going (row 4 is waiting for its reply)
            lines = sorted(json.loads(ln)["line"] for ln in errors.read_text(encoding="utf-8").splitlines())
        finally:
            proc.kill()
            proc.wait()
    assert lines == [1, 2, 3] and not out.exists()


def test_translate_gives_up_on_an_endpoint_that_stops_answering(tmp_path):
    src = write_jsonl(tmp_path / "lima.jsonl", lima(6, {i: "503" for i in range(1, 6)}))
    before = snapshot(src)
    with FakeChatServer() as server:
        start = time.monotonic()
        proc = translate(src, tmp_path / "kolima.jsonl", server.base_url, "--concurrency", "1", "--give-up-after", "1",
                         "--backoff", "0.1", "--max-attempts", "100000")
        elapsed = time.monotonic() - start
    refused(proc, r"^error: no request to .* has succeeded for 1 s \(last error: HTTP 503\); the endpoint looks down: "
                  r"finished rows are cached, rerun the same command to resume \(or raise --give-up-after\)$")
    assert elapsed < 20 and snapshot(src) == before and not (tmp_path / "kolima.jsonl").exists()
    assert (tmp_path / "kolima.jsonl.cache.jsonl").read_text(encoding="utf-8").count("\n") == 1  # row 1 kept


# ---------------------------------------------------------------- 3 + 4: rows the builders refuse, one line numbering


def test_translate_lists_rows_the_builders_refuse_by_line_and_sends_nothing_unless_skip_invalid(tmp_path):
    rows = [*lima(1), None, {"conversations": ["q", "a", "q2"]}, {"conversations": ["q", " "]}, *lima(1)]
    src = write_jsonl(tmp_path / "lima.jsonl", rows)  # line 2 is blank
    before = snapshot(src)
    out = tmp_path / "kolima.jsonl"
    with FakeChatServer() as server:
        refused(translate(src, out, server.base_url),
                r"^error: 2 of 4 rows are not chat rows the dataset builders accept, nothing was sent: lima.jsonl "
                r"line 3: field 'conversations' has 3 turns; .*; lima.jsonl line 4: conversations\[1\] is empty; .*"
                r"pass --skip-invalid to translate the others$")
        assert server.log == [] and not out.exists()
        proc = translate(src, out, server.base_url, "--skip-invalid")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert re.search(r"^warning: left out 2 rows the dataset builders refuse \(first: lima.jsonl line 3: ", proc.stderr)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2 and snapshot(src) == before


def test_dataset_builders_and_translate_name_the_same_line(tmp_path):
    """kolima_dataset reads rows through kobllla.conversations.read_conversations: same line, blanks counted."""
    src = write_jsonl(tmp_path / "k.jsonl", [*lima(1), None, None, {"conversations": ["q"]}])
    code = ("from kobllla.conversations import read_conversations as r; "
            f"list(r({str(src)!r}, data_files=None, split='train', conversation_column='conversations', "
            "system_column=None))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "k.jsonl line 4: field 'conversations' has 1 turns" in proc.stderr
    refused(translate(src, tmp_path / "o.jsonl", "http://127.0.0.1:9/v1"),
            r"k.jsonl line 4: field 'conversations' has 1 turns")


# ---------------------------------------------------------------- 7 + 1: pretokenize (imports torch: one test)


def test_pretokenize_caps_an_echoed_tokenizer_json_and_refuses_an_output_over_its_input(tmp_path):
    tok_json = tmp_path / "tokenizer.json"  # one line, like an HF tokenizer.json: the loader quotes the line
    tok_json.write_text(json.dumps({"model": {"vocab": {f"tok{i}": i for i in range(60_000)}}}), encoding="utf-8")
    data = tmp_path / "ko.csv"
    data.write_text("text\n가나다\n", encoding="utf-8")
    before = snapshot(tmp_path)
    proc = cli("tools.pretokenize", "--source", data, "--tokenizer", tok_json, "--out", tmp_path / "out")
    line = refused(proc, r"tokenizer.json: not a Llama 3 tiktoken tokenizer.model "
                         r"\(ValueError: .*more characters\)\); "
                         r"pass <model dir>/original/tokenizer.model, not tokenizer.json$")
    assert len(line) < 1000 < tok_json.stat().st_size
    from kobllla.assets import llama3_tokenizer_model_path

    proc = cli("tools.pretokenize", "--source", data, "--tokenizer", llama3_tokenizer_model_path(), "--out", tmp_path,
               "--overwrite")
    refused(proc, r"^error: output .* would overwrite or replace input .*; inputs are never modified")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ko.csv", "tokenizer.json"]


# ---------------------------------------------------------------- 8: make_corpus keeps edited files


def test_make_corpus_keeps_files_a_user_edited_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    assert cli("tools.make_corpus", "--out", out).returncode == 0
    (out / "ko_train.csv").write_text("text\n내가 고친 문서\n", encoding="utf-8")
    before = snapshot(out)
    refused(cli("tools.make_corpus", "--out", out),
            r"^error: .*data already holds ko_train.csv, ko_heldout.csv, en_train.csv, en_heldout.csv; pick another "
            r"--out or pass --overwrite to replace them$")
    assert snapshot(out) == before
    refused(cli("tools.make_corpus", "--out", out, "--overwrite", "--heldout-every", "1"),
            r"^error: --heldout-every must be at least 2 \(every k-th document is held out\), got 1$")
    assert snapshot(out) == before
    assert cli("tools.make_corpus", "--out", out, "--overwrite").returncode == 0
    assert "내가 고친 문서" not in (out / "ko_train.csv").read_text(encoding="utf-8")


# ---------------------------------------------------------------- 9 + 1: build_kowikitext


def test_build_kowikitext_refuses_an_empty_train_split_and_an_output_holding_the_dump(tmp_path):
    pages = [WikiPage(i, f"문서 {i}", "한국어 문장입니다. " * 20) for i in range(1, 6)]
    dump = write_dump(tmp_path / "kowiki.xml", pages, compress="none")
    before = snapshot(dump)
    refused(cli("tools.build_kowikitext", "--dump", dump, "--out", tmp_path / "kw", "--min-chars", "100000",
                "--workers", "1", "--no-progress"),
            r"^error: kowiki.xml: no page kept for the train split \(5 pages read, 0 kept; dropped: not_article 0, "
            r"redirect 0, too_short 5, duplicate 0, parse_error 0; too_short means under --min-chars 100000\); "
            r"nothing was written: lower --min-chars or pass a larger dump$")
    refused(cli("tools.build_kowikitext", "--dump", dump, "--out", tmp_path, "--overwrite", "--workers", "1",
                "--no-progress"), r"^error: output .* would overwrite or replace input .*kowiki.xml")
    assert snapshot(dump) == before and sorted(p.name for p in tmp_path.iterdir()) == ["kowiki.xml"]


# ---------------------------------------------------------------- 10: eval.report on an empty history


def test_eval_report_on_an_empty_history_says_no_run_finished(tmp_path):
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "history.jsonl").write_text("", encoding="utf-8")
    refused(cli("eval.report", tmp_path / "res", "--out", tmp_path / "report"),
            r"^error: .*res/history.jsonl lists no run \(the file is empty or blank\): no evaluation has finished "
            r"there yet; run `python -m eval.run --results-dir .*res` first$")
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------- 6: eval.run offline without --data-dir


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory) -> Path:
    from kobllla.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "mini", preset="mini", dtype="float32")


def test_eval_run_offline_without_data_dir_names_the_dataset_and_the_data_dir_layout(tmp_path, mini_model):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = cli("eval.run", "--model", f"mini={mini_model}", "--task", "truthfulqa_mc2", "--device", "cpu",
               "--results-dir", tmp_path / "res", env=offline, timeout=300)
    refused(proc, r"^error: truthfulqa_mc2 needs the hub dataset truthfulqa/truthful_qa \(multiple_choice\), which is "
                  r"not in the local cache .*cache and cannot be fetched \(offline mode: ConnectionError\); pass "
                  r"--data-dir DATA_DIR with each split as DATA_DIR/<dataset>/<config>/<split>.jsonl, here "
                  r"DATA_DIR/truthfulqa/truthful_qa/multiple_choice/validation.jsonl, written on a machine with "
                  r"network by datasets.load_dataset\('truthfulqa/truthful_qa', 'multiple_choice'")
    assert not (tmp_path / "res").exists()
    (tmp_path / "res").write_text("mine", encoding="utf-8")
    refused(cli("eval.run", "--model", f"mini={mini_model}", "--task", "truthfulqa_mc2", "--device", "cpu",
                "--results-dir", tmp_path / "res", timeout=300),
            r"^error: --results-dir .*res is a file; pass a directory for runs/ and history.jsonl$")
    assert (tmp_path / "res").read_text(encoding="utf-8") == "mine"


# ---------------------------------------------------------------- H-qa: eval.run / eval.report / atomic outputs


def test_eval_run_refuses_broken_weights_adapter_only_dirs_results_in_the_model_and_bad_flags(tmp_path, mini_model):
    import shutil

    zero = shutil.copytree(mini_model, tmp_path / "zero")
    (zero / "model.safetensors").write_bytes(b"")
    adapter = tmp_path / "epoch_0"
    adapter.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(mini_model / name, adapter / name)
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}', encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    base = ["--task", "truthfulqa_mc2", "--device", "cpu"]
    refused(cli("eval.run", "--model", f"z={zero}", *base, "--results-dir", tmp_path / "res", timeout=300),
            r"^error: .*zero/model.safetensors: 0 bytes is too short for a safetensors file \(truncated\?\)")
    refused(cli("eval.run", "--model", f"a={adapter}", *base, "--results-dir", tmp_path / "res", timeout=300),
            r"^error: .*epoch_0 holds only a LoRA adapter \(adapter_model.safetensors\); lm_eval needs full weights: "
            r"merge it into its base first with python -m tools.check_model .*epoch_0 --base BASE_DIR")
    before = snapshot(mini_model)
    refused(cli("eval.run", "--model", f"m={mini_model}", *base, "--results-dir", mini_model, timeout=300),
            r"^error: --results-dir .*mini is or lies inside/around the model dir .*mini; the checkpoint dir is "
            r"never written to")
    refused(cli("eval.run", "--model", f"m={mini_model}", *base, "--results-dir", mini_model / "res", timeout=300),
            r"^error: --results-dir .*mini/res is or lies inside/around the model dir")
    assert snapshot(mini_model) == before
    for flag, value, message in [("--limit", "0", r"--limit must be > 0"), ("--limit", "-1", r"--limit must be > 0"),
                                 ("--batch-size", "0", r"--batch-size must be >= 1")]:
        proc = cli("eval.run", "--model", f"m={mini_model}", *base, "--results-dir", tmp_path / "res", flag, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert re.search(rf"error: argument {flag}: {message}", proc.stderr), proc.stderr
    assert not (tmp_path / "res").exists()


def test_eval_report_refuses_an_out_that_is_holds_or_lies_inside_its_inputs(tmp_path):
    res = tmp_path / "ev"
    (res / "runs").mkdir(parents=True)
    (res / "history.jsonl").write_text("", encoding="utf-8")
    before = snapshot(res)
    for out in (res, res / "runs", res / "report"):
        refused(cli("eval.report", res, "--out", out),
                rf"^error: --out {re.escape(str(out))} is, holds or lies inside the input {re.escape(str(res))}; "
                r"run records are never written over")
    record = res / "runs" / "A.json"
    record.write_text("{}", encoding="utf-8")
    refused(cli("eval.report", record, "--out", res / "runs"), r"^error: --out .*ev/runs is, holds or lies inside "
                                                              r"the input .*ev/runs/A.json")
    before[record] = b"{}"
    assert snapshot(res) == before


def test_directory_outputs_never_replace_a_file_and_stale_old_siblings_are_cleaned(tmp_path):
    from kobllla.atomic import atomic_output_dir, remove_stale_temporaries, replace_dir

    target = tmp_path / "out.jsonl"
    target.write_text("mine\n", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match=r"out.jsonl is a file, not a directory"):
        with atomic_output_dir(target, overwrite=True):
            pass
    assert target.read_text(encoding="utf-8") == "mine\n"
    tmp = tmp_path / "new"
    tmp.mkdir()
    replace_dir(tmp, target)  # the library primitive itself still replaces; the trash is removed
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".x.old-{pid}").write_text("old", encoding="utf-8")
    (tmp_path / f".x.old-{os.getpid()}").mkdir()  # a live run's: kept
    (tmp_path / f".x.tmp-{pid}").mkdir()
    remove_stale_temporaries(tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".x.old-{os.getpid()}", "out.jsonl"]
    model = tmp_path / "m"
    from kobllla.tiny_model import make_model

    make_model(model, preset="mini", dtype="float32")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "x"}\n', encoding="utf-8")
    refused(cli("tools.check_model", model, "--fix-stop-tokens", "--out", prompts, "--overwrite"),
            r"^error: --out .*p.jsonl is a file; the fixed copy is a model directory")
    assert prompts.read_text(encoding="utf-8") == '{"id": 1, "prompt": "x"}\n'
    assert not list(tmp_path.glob(".p.jsonl.*"))


def test_help_examples_keep_their_line_continuations_and_escapes():
    for module, want in [("eval.run", "--model stage1=runs/stage1/epoch_0 \\\n"),
                         ("eval.report", "--pair stage3=instruct \\\n"),
                         ("tools.chat", "printf '안녕?\\n이름이 뭐야?\\n' | python -m tools.chat")]:
        proc = cli(module, "--help")
        assert proc.returncode == 0 and want in proc.stdout, (module, proc.stdout[:800])


def test_count_and_time_flags_are_refused_by_their_own_flag_name(tmp_path):
    pages = [WikiPage(i, f"문서 {i}", f"한국어 문장 {i}번입니다. " * 20) for i in range(1, 6)]
    dump = write_dump(tmp_path / "kowiki.xml", pages, compress="none")
    cases = [("tools.pretokenize", ["--source", "x", "--tokenizer", "t", "--out", tmp_path / "o"], "--workers", "0",
              "must be >= 1, got '0'"),
             ("tools.pretokenize", ["--source", "x", "--tokenizer", "t", "--out", tmp_path / "o"], "--chunk-rows", "0",
              "must be >= 1, got '0'"),
             ("tools.translate_dataset", ["--input", "a", "--output", tmp_path / "o", "--base-url", "http://x",
                                          "--model", "m"], "--concurrency", "0", "must be >= 1, got '0'"),
             ("tools.translate_dataset", ["--input", "a", "--output", tmp_path / "o", "--base-url", "http://x",
                                          "--model", "m"], "--timeout", "-1", "must be > 0, got '-1'"),
             ("tools.build_kowikitext", ["--dump", dump, "--out", tmp_path / "o"], "--min-chars", "-5",
              "must be >= 0, got '-5'"),
             ("tools.build_kowikitext", ["--dump", dump, "--out", tmp_path / "o"], "--dev-fraction", "1.5",
              "must be >= 0 and < 1, got '1.5'")]
    for module, args, flag, value, message in cases:
        proc = cli(module, *args, flag, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith(f"error: argument {flag}: {message}"), proc.stderr
    assert not (tmp_path / "o").exists()
    done = cli("tools.build_kowikitext", "--dump", dump, "--out", tmp_path / "kw", "--workers", "1", "--min-chars",
               "10", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "warning: the dev split has 0 pages (5 kept x --dev-fraction 0.005); raise --dev-fraction" in done.stderr
    help_text = cli("tools.build_kowikitext", "--help").stdout
    assert "expected share of pages in dev, by a hash of the page" in help_text and "(default 0.005)" in help_text
