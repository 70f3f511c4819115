"""The stage-1 GPU benchmark's arithmetic and inputs (bench/train_gpu.py), checked on CPU.

The benchmark itself runs on a GPU through the device tool; what is tested here is what its
figures are computed from: FLOPs per position, MFU, steady-state step accounting, the metric log
it parses, the pack counting behind "useful tokens" and "padding share", and the config it hands
to ``tune run``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kobllla.assets import llama3_tokenizer_model_path
from kobllla.datasets._windows import packed_sample

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).parent / "assets"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_gpu", REPO / "bench" / "train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

LLAMA3_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)


def test_matmul_weights_of_llama3_8b_are_all_params_but_embedding_and_norms():
    n = bench.matmul_params(**LLAMA3_8B)
    assert n == 7_504_658_432
    embedding, norms = 128256 * 4096, (2 * 32 + 1) * 4096
    assert n + embedding + norms == 8_030_261_248  # Meta-Llama-3-8B's parameter count


def test_lora_flops_per_position_at_seq_4096_is_36_46_gflop():
    flops = bench.lora_flops_per_position(n_matmul=7_504_658_432, layers=32, hidden=4096, seq_len=4096)
    assert flops == 4 * 7_504_658_432 + 12 * 32 * 4096 * 4096 == 36_461_084_672


def test_mfu_is_model_flops_over_peak():
    assert bench.mfu(positions_per_s=16_000, flops_per_position=36_461_084_672, peak_flops=989e12) == pytest.approx(
        16_000 * 36_461_084_672 / 989e12, rel=1e-12)
    with pytest.raises(ValueError, match="peak_flops must be positive, got 0"):
        bench.mfu(positions_per_s=1.0, flops_per_position=1, peak_flops=0)


def test_peak_flops_known_for_hopper_and_refused_for_unknown_devices():
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops_for("NVIDIA H200") == 989e12
    assert bench.peak_flops_for("Tesla T4", override_tflops=65.0) == 65e12
    with pytest.raises(ValueError, match=r"no bf16 peak known for device 'Tesla T4'; pass --peak-tflops"):
        bench.peak_flops_for("Tesla T4")


def test_count_pack_tells_padding_from_piece_starts():
    sample = packed_sample(np.arange(1, 11), [4, 6], max_len=12, pad_id=0, ignore_index=-100)
    assert sample["labels"] == [-100, 2, 3, 4, -100, 6, 7, 8, 9, 10, -100, -100]
    fig = bench.PackFigures()
    bench.count_pack(fig, sample["labels"], sample["seq_lens"], real_len=10)
    assert (fig.packs, fig.positions, fig.trained, fig.padding, fig.piece_starts) == (1, 12, 8, 2, 2)
    assert fig.padding_share == 2 / 12


def test_steady_state_skips_warmup_and_weights_steps_by_their_time():
    rows = [
        {"step": 1, "tokens_per_second_per_gpu": 10.0, "wall_time": 100.0},  # compilation: left out
        {"step": 2, "tokens_per_second_per_gpu": 1000.0, "wall_time": 101.0},  # 1 s, 1000 tokens
        {"step": 3, "tokens_per_second_per_gpu": 500.0, "wall_time": 103.0},  # 2 s, 1000 tokens
    ]
    got = bench.steady_state(rows, warmup=1, positions_per_step=1000)
    assert got["steps_measured"] == 2
    assert got["seconds"] == 3.0
    assert got["trained_tokens"] == 2000.0
    assert got["useful_tokens_per_s"] == pytest.approx(2000 / 3)
    assert got["positions_per_s"] == pytest.approx(2000 / 3)
    assert got["useful_tokens_per_s_median_step"] == 750.0
    with pytest.raises(ValueError, match=r"need more than warmup \+ 1 = 3 logged steps, got 3: raise --steps"):
        bench.steady_state(rows, warmup=2, positions_per_step=1000)


def test_gc_passes_are_charged_to_the_step_they_started_in():
    rows = [{"step": k, "wall_time": 100.0 + 2 * k} for k in (1, 2, 3, 4)]  # steps 2-4 end at 104, 106, 108
    passes = [[2, 101.0, 0.3, 9], [0, 103.0, 0.001, 0], [2, 105.5, 0.2, 5], [1, 105.6, 0.01, 1], [0, 108.0, 0.002, 0],
              [2, 109.0, 0.5, 0]]  # the first in step 1 (not logged as a step), the last after the run
    got = bench.gc_by_step(passes, rows, warmup=2)
    assert got["per_step"] == {2: [0, 0.0, 0.001], 3: [1, 0.2, 0.21], 4: [0, 0.0, 0.002]}
    assert got["measured"] == {"full_passes": 1, "full_s": 0.2, "all_s": 0.212, "longest_pass_s": 0.2}


def test_gc_probe_runs_the_module_as_python_m_and_times_every_pass(tmp_path):
    out = tmp_path / "gc.json"
    prog = "import gc, sys; gc.collect(); gc.collect(1); print(sys.argv[1:], __name__)"
    (tmp_path / "probe_target.py").write_text(prog, encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gc_probe.py"), str(out), "probe_target", "a", "-b"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['a', '-b'] __main__"
    got = json.loads(out.read_text(encoding="utf-8"))
    gens = [p[0] for p in got["passes"]]
    assert 2 in gens and 1 in gens[gens.index(2) + 1:] and all(p[2] >= 0 for p in got["passes"])
    assert got["python"] == sys.version


def test_wall_clock_logger_writes_tensors_as_numbers_and_parses_back(tmp_path):
    logger = bench.WallClockDiskLogger(str(tmp_path), filename="log.txt")
    logger.log_dict({"tokens_per_second_per_gpu": torch.tensor(5.5), "loss": 2.0}, step=1)
    logger.close()
    rows = bench.parse_metric_log((tmp_path / "log.txt").read_text())
    assert rows[0]["step"] == 0 and "logger_created_wall_time" in rows[0]
    assert rows[1]["step"] == 1 and rows[1]["tokens_per_second_per_gpu"] == 5.5 and rows[1]["loss"] == 2.0
    assert rows[1]["wall_time"] >= rows[0]["logger_created_wall_time"]


def test_parse_metric_log_refuses_what_it_cannot_read():
    with pytest.raises(ValueError,
                       match=r"metric log line 1: tokens_per_second_per_gpu='tensor\(5.5,' is not a number"):
        bench.parse_metric_log("Step 1 | tokens_per_second_per_gpu:tensor(5.5, device='cuda:0')")
    with pytest.raises(ValueError, match=r"metric log line 2: 'garbage' is not key:value"):
        bench.parse_metric_log("header\nStep 2 | garbage")


def test_packs_keep_every_token_of_the_fixture_articles(tmp_path):
    got = bench.build_packs(ASSETS / "kowiki_tiny.csv", tokenizer_path=llama3_tokenizer_model_path(),
                            seq_len=64, packs_out=tmp_path / "packs.npz")
    assert got["documents"] == 3  # the empty and whitespace-only rows are skipped
    assert got["trained"] == got["corpus_tokens"] - got["documents"]
    assert got["positions"] == got["packs"] * 64
    assert 0 <= got["padding"] < 64  # only the last pack is padded
    with np.load(tmp_path / "packs.npz") as npz:
        assert npz["tokens"].shape == npz["labels"].shape == npz["input_pos"].shape == (got["packs"], 64)
        assert int((npz["labels"] != -100).sum()) == got["trained"]


def test_korean_length_mix_is_seeded_and_reaches_its_size(tmp_path):
    a = bench.korean_length_mix_csv(tmp_path / "a.csv", target_chars=20_000, seed=3)
    b = bench.korean_length_mix_csv(tmp_path / "b.csv", target_chars=20_000, seed=3)
    assert a == b and (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert a["chars"] >= 20_000 and 80 <= a["median_chars"] <= a["max_chars"] <= 40_000


def test_recipe_config_is_the_shipped_one_with_the_benchmark_overrides(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    bench.write_recipe_config(path, model_dir=Path("/m"), files=["a.safetensors"], csv_path=Path("/d.csv"),
                              run_dir=tmp_path / "run", preset="llama3-8b", seq_len=4096, batch_size=2, steps=20,
                              compile_model=True, device="cuda", dtype="bf16")
    cfg = OmegaConf.to_container(OmegaConf.load(path))  # as tune run reads it (PyYAML reads 3e-4 as a string)
    shipped = OmegaConf.to_container(OmegaConf.load(REPO / "configs/llama3_8b/stage1_kowiki_lora_single_device.yaml"))
    assert cfg["model"] == shipped["model"] and cfg["optimizer"] == shipped["optimizer"]
    assert cfg["loss"] == shipped["loss"]
    assert cfg["tokenizer"] == {**shipped["tokenizer"], "path": "/m/original/tokenizer.model", "max_seq_len": 4096}
    assert cfg["checkpointer"]["checkpoint_files"] == ["a.safetensors"]
    assert (cfg["batch_size"], cfg["gradient_accumulation_steps"], cfg["max_steps_per_epoch"]) == (2, 1, 20)
    assert cfg["compile"] is True and cfg["enable_activation_checkpointing"] is False
    assert cfg["dataset"]["data_files"] == "/d.csv" and cfg["dataset"]["pack"] is True
    assert "packed" not in cfg["dataset"]
    assert cfg["collate_fn"] == shipped["collate_fn"] == "kobllla.datasets.packed_varlen_collate"
    assert cfg["model"]["attention"] == "cudnn"
    assert cfg["metric_logger"]["_component_"] == "bench.train_gpu.WallClockDiskLogger"


def test_variants_swap_only_the_model_loss_and_collate_components(tmp_path):
    common = dict(model_dir=Path("/m"), files=["a.safetensors"], csv_path=Path("/d.csv"), run_dir=tmp_path / "run",
                  seq_len=4096, batch_size=1, steps=50, compile_model=True, device="cuda", dtype="bf16")
    shipped = bench.write_recipe_config(tmp_path / "s.yaml", preset="llama3-8b", **common)
    stock = bench.write_recipe_config(tmp_path / "a.yaml", preset="llama3-8b", variant="stock", **common)
    fp8 = bench.write_recipe_config(tmp_path / "b.yaml", preset="llama3-8b", variant="fp8", **common)
    lora = {k: v for k, v in shipped["model"].items() if k not in ("_component_", *bench.SPEED_KEYS)}
    assert "lora_rank" in lora and "attention" not in lora
    assert stock["model"] == {"_component_": "torchtune.models.llama3.lora_llama3_8b", **lora}
    assert stock["loss"] == {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}
    assert fp8["model"] == {"_component_": "kobllla.models.lora_llama3_8b", **lora, "output": "hidden", "fp8": True}
    assert fp8["loss"] == {"_component_": "kobllla.losses.FusedLinearCrossEntropyLoss"}
    for cfg in (stock, fp8):  # torchtune's collate for these; the shipped config's is kobllla's
        rest = {k: v for k, v in cfg.items() if k not in ("model", "loss", "dataset", "collate_fn")}
        assert rest == {k: v for k, v in shipped.items() if k not in ("model", "loss", "dataset", "collate_fn")}
        assert cfg["dataset"]["packed"] is True and "pack" not in cfg["dataset"] and "collate_fn" not in cfg
        assert {k: v for k, v in cfg["dataset"].items() if k != "packed"} == \
            {k: v for k, v in shipped["dataset"].items() if k != "pack"}
    accum = bench.write_recipe_config(tmp_path / "g.yaml", preset="llama3-8b", variant="stock", grad_accum=8, **common)
    assert accum["gradient_accumulation_steps"] == 8 and stock["gradient_accumulation_steps"] == 1
    tiny = bench.write_recipe_config(tmp_path / "t.yaml", preset="tiny", variant="fused", **common)
    assert tiny["model"]["_component_"] == "kobllla.models.lora_llama3" and tiny["model"]["output"] == "hidden"
    fast = bench.write_recipe_config(tmp_path / "f.yaml", preset="llama3-8b", variant="fp8all", **common)
    assert fast["model"] == {"_component_": "kobllla.models.lora_llama3_8b", **lora, "fp8": True, "fp8_output": True,
                             "fuse_projections": True, "attention": "flex_inline"}
    pc = bench.write_recipe_config(tmp_path / "p.yaml", preset="llama3-8b", variant="inlinepc", **common)
    assert pc["collate_fn"] == "kobllla.datasets.packed_collate" and pc["dataset"]["pack"] is True
    assert "packed" not in pc["dataset"] and "collate_fn" not in stock
    cu = bench.write_recipe_config(tmp_path / "c.yaml", preset="llama3-8b", variant="cudnn", **common)
    assert cu["collate_fn"] == "kobllla.datasets.packed_varlen_collate" and cu["dataset"]["pack"] is True
    assert cu["model"] == {"_component_": "kobllla.models.lora_llama3_8b", **lora, "attention": "cudnn"}
    pn = bench.write_recipe_config(tmp_path / "n.yaml", preset="llama3-8b", variant="persistbs2", **common)
    assert pn["model"] == {**shipped["model"], "persistent_norms": True} and pn["loss"] == shipped["loss"]
    assert pn["collate_fn"] == shipped["collate_fn"] and "persistent_norms" not in stock["model"]
    rope = bench.write_recipe_config(tmp_path / "r.yaml", preset="llama3-8b", variant="ropebs2", **common)
    assert shipped["model"]["fused_rope"] is False and rope["model"] == {**shipped["model"], "fused_rope": True}
    assert set(bench.VARIANT_MODEL) <= set(bench.VARIANTS)
    with pytest.raises(ValueError, match=r"unknown variant 'bf16'; choose from \['cudnn', 'cudnnbs2', .*'shipped', "
                                         r".*'stock', 'stockpc'\]"):
        bench.write_recipe_config(tmp_path / "x.yaml", preset="tiny", variant="bf16", **common)


def test_loss_agreement_compares_each_run_with_the_reference_step_by_step():
    got = bench.loss_agreement({"ref": [10.0, 8.0, 4.0], "a": [10.0, 8.08, 4.2], "short": [11.0]}, reference="ref",
                               first=2)
    assert got["a"]["steps_compared"] == 2 and got["a"]["max_rel_first_n"] == pytest.approx(0.01)
    assert got["a"]["rel_last"] == pytest.approx(0.05) and got["a"]["last_step"] == 3
    assert got["short"] == {"steps_compared": 1, "max_rel_first_n": pytest.approx(0.1), "last_step": 1,
                            "rel_last": pytest.approx(0.1), "loss_last": 11.0, "reference_loss_last": 10.0}
    with pytest.raises(ValueError, match=r"no reference run 'stock'; have \['a'\]"):
        bench.loss_agreement({"a": [1.0]}, reference="stock", first=30)


def test_variant_option_lists_the_valid_names():
    assert bench.parse_args(["--variants", "stock,fp8"]).variants == ["stock", "fp8"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "stock,fp16"])


def test_trace_gaps_charges_each_idle_gap_to_the_code_that_launched_the_next_kernel():
    from bench.trace_gaps import gap_report, markdown

    def x(name, cat, ts, dur, tid=1, corr=None):
        ev = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
        if corr is not None:
            ev["args"] = {"correlation": corr}
        return ev

    events = [
        x("ProfilerStep#7", "user_annotation", 0, 1000),
        x("data", "cpu_op", 40, 56), x("cudaLaunchKernel", "cuda_runtime", 90, 2, corr=1),
        x("CompiledFunction", "cpu_op", 300, 60), x("aten::mm", "cpu_op", 310, 20),
        x("cudaLaunchKernel", "cuda_runtime", 320, 2, corr=2),
        x("cudaStreamSynchronize", "cuda_runtime", 610, 250),
        x("Optimizer.step", "cpu_op", 870, 20), x("cudaLaunchKernel", "cuda_runtime", 880, 2, corr=3),
        x("gemm_kernel", "kernel", 100, 200, tid=7, corr=1), x("triton_poi_fused", "kernel", 350, 250, tid=7, corr=2),
        x("Memcpy HtoD", "gpu_memcpy", 900, 50, tid=7, corr=3),
    ]
    rep = gap_report({"traceEvents": events})
    assert rep["mean"]["wall_ms"] == 1.0 and rep["mean"]["gpu_busy_ms"] == 0.5 and rep["mean"]["idle_ms"] == 0.5
    top = {r["where"]: r["idle_ms_per_step"] for r in rep["idle_by_top_op"]}
    assert top == {"Optimizer.step": 0.3, "data": 0.1, "CompiledFunction": 0.05,
                   "(end of step: nothing launched)": 0.05}
    assert {r["where"] for r in rep["idle_by_inner_op"]} >= {"aten::mm"}
    assert rep["blocking_calls_per_step"] == {"cudaStreamSynchronize": {"calls": 1.0, "ms": 0.25}}
    assert rep["gpu_ms_per_step_by_kind"] == {"triton (fused elementwise/reductions)": 0.25, "matmul": 0.2,
                                              "memcpy": 0.05}
    assert "idle 0.5 ms (50.0 %)" in markdown(rep)
    with pytest.raises(ValueError, match="ProfilerStep"):
        gap_report({"traceEvents": events[1:]})


def test_a_variant_s_process_settings_reach_the_recipe_process_only(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, log_path, *, env, timeout_s):
        seen["env"] = env
        return 3

    monkeypatch.setattr(bench, "_run_logged", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", raising=False)
    res = bench.run_ours(cfg_path=tmp_path / "c.yaml", run_dir=tmp_path, log_path=tmp_path / "l.log", warmup=1,
                         positions_per_step=8, timeout_s=1, env=bench.VARIANT_ENV["shippedcd"])
    assert seen["env"]["TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"] == "1" and seen["env"]["PATH"] == os.environ["PATH"]
    assert "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING" not in os.environ
    assert res["env"] == {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"} and res["rc"] == 3 and "error" in res
    assert set(bench.VARIANT_ENV) <= set(bench.VARIANTS)


def test_batch_variants_keep_the_packs_per_optimizer_step():
    assert bench.variant_batch("shippedbs2", batch_size=1, grad_accum=8) == (2, 4)
    assert bench.variant_batch("shippedbs4", batch_size=1, grad_accum=8) == (4, 2)
    assert bench.variant_batch("shipped", batch_size=1, grad_accum=8) == (1, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        bench.variant_batch("shippedbs4", batch_size=1, grad_accum=6)
    assert bench.main(["--variants", "shipped,shippedbs4", "--grad-accum", "6", "--steps", "5", "--warmup", "1"]) == 2
    # the profiler traces micro-batches 9-11 of 12: whole optimizer steps at accumulation 1, the middle of one at 4
    assert bench.profile_steps(1) == 13 and bench.profile_steps(4) == 4 and bench.profile_steps(8) == 3


def test_a_run_s_figures_carry_its_gpu_clock_when_it_was_sampled():
    run = {"useful_tokens_per_s": 17000.0, "useful_tokens_per_s_median_step": 17100.0, "positions_per_s": 17050.0,
           "gpu_clocks": {"busy_samples": 9, "sm_mhz_mean": 1553.0, "power_w_mean": 685.0, "power_capped_share": 1.0}}
    got = bench.figures(run, flops_per_position=10, peak=None)
    assert got["sm_mhz_mean"] == 1553.0 and got["power_w_mean"] == 685.0 and got["power_capped_share"] == 1.0
    assert "sm_mhz_mean" not in bench.figures({**run, "gpu_clocks": {"busy_samples": 0}}, flops_per_position=10,
                                               peak=None)


def test_a_profile_accumulation_below_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile", "shipped", "--profile-accum", "0"])
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err


def test_prev_variants_take_the_previous_codes_config_or_say_how_to_get_it(tmp_path, monkeypatch):
    common = dict(model_dir=Path("/m"), files=["a.safetensors"], csv_path=Path("/d.csv"), run_dir=tmp_path / "run",
                  seq_len=4096, batch_size=1, steps=5, compile_model=True, device="cuda", dtype="bf16")
    monkeypatch.setattr(bench, "PREV_DIR", tmp_path / "prev")
    with pytest.raises(FileNotFoundError, match=r"git archive REV kobllla configs \| tar -x -C .prev"):
        bench.write_recipe_config(tmp_path / "p.yaml", preset="llama3-8b", variant="prev", **common)
    old = tmp_path / "prev" / bench.SHIPPED_CONFIG.relative_to(bench.REPO)
    old.parent.mkdir(parents=True)
    text = bench.SHIPPED_CONFIG.read_text(encoding="utf-8").replace("attention: cudnn", "attention: flex_inline")
    old.write_text(text, encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"prev/kobllla/__init__.py: the prevbs2 variant runs the previous"):
        bench.write_recipe_config(tmp_path / "p.yaml", preset="llama3-8b", variant="prevbs2", **common)
    (tmp_path / "prev" / "kobllla").mkdir()
    (tmp_path / "prev" / "kobllla" / "__init__.py").write_text("", encoding="utf-8")
    cfg = bench.write_recipe_config(tmp_path / "p.yaml", preset="llama3-8b", variant="prevbs2", **common)
    assert cfg["model"]["attention"] == "flex_inline"
    assert bench.variant_batch("prevbs2", batch_size=1, grad_accum=8) == (2, 4)


def test_a_run_that_cannot_finish_before_the_deadline_is_not_started(tmp_path, monkeypatch):
    """The eighth call's last variant started with 60 s left, was killed at the deadline and measured nothing:
    a run starts only while the slowest finished run would still fit."""
    now = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(time=lambda: now[0]))  # the benchmark's clock only
    monkeypatch.setattr(bench, "_prepare", lambda args, res, device: {})
    started = []

    def fake_run(name, *, timeout_s, variant, **_):
        started.append((variant, timeout_s))
        now[0] += 100.0 if variant != "inline" else 120.0
        return {"variant": variant, "rc": 0, "wall_s": 100.0 if variant != "inline" else 120.0}

    monkeypatch.setattr(bench, "_ours_run", fake_run)
    args = bench.parse_args(["--out", str(tmp_path), "--variants", "shipped,inline,stock,fused", "--peer-steps", "0",
                             "--deadline-s", "370", "--ours-timeout-s", "300", "--profile", "shipped"])
    res = bench.run_all(args)
    # 370 s: shipped (0-100), inline (100-220), stock (220-320); fused would need 120 s with 45 left
    assert [v for v, _ in started] == ["shipped", "inline", "stock"]
    assert started[0][1] == 300 and started[2][1] == pytest.approx(145)
    assert res["ours-fused"]["error"] == "skipped: 45 s left < 120 s, the slowest finished run"
    assert res["profile-shipped"]["error"] == res["ours-fused"]["error"]  # the profiled runs after them too
    assert bench.too_late([], 10) is None and bench.too_late([50.0], 50) is None
