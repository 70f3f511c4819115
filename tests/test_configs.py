"""Every shipped config validates, and every dataset in it builds on the fixtures."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset, PackedDataset

from kobllla.datasets._collate import COLLATE_PATHS, VARLEN_COLLATE_PATH
from tests.conftest import ASSETS, REPO, make_llama3_tokenizer

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
STAGE_COMMAND = {
    "stage1_kowiki_lora.yaml": "lora_finetune_distributed",
    "stage3_kolima_bilima_lora.yaml": "lora_finetune_distributed",
    "stage1_kowiki_lora_single_device.yaml": "lora_finetune_single_device",
    "stage1_kowiki_qlora_single_device.yaml": "lora_finetune_single_device",
    "stage0_pretrain_en_full.yaml": "full_finetune_single_device",
    "stage0_instruct_en_full.yaml": "full_finetune_single_device",
    "stage1_pretokenized_lora.yaml": "lora_finetune_distributed",
    "translation_ko_zh_lora.yaml": "lora_finetune_single_device",
    "alpaca_en_zh_lora.yaml": "lora_finetune_single_device",
}
# the demo's stage 3 runs on one CPU process (55-57 s for its 94 steps, 87 s on 2 gloo ranks)
STAGE_COMMAND_BY_PATH = {"demo/stage3_kolima_bilima_lora.yaml": "lora_finetune_single_device"}



def dataset_nodes(cfg: DictConfig) -> list[DictConfig]:
    node = cfg.dataset
    return list(node) if isinstance(node, ListConfig) else [node]


def component_nodes(cfg: DictConfig):
    for key, node in cfg.items():
        if isinstance(node, DictConfig) and "_component_" in node:
            yield key, node
    for node in dataset_nodes(cfg):
        yield "dataset", node
        for sub in node.get("datasets") or []:  # mixed_dataset's sources
            yield "dataset.datasets", sub


def test_there_are_8b_and_tiny_configs_for_every_stage():
    names = {(p.parent.name, p.name) for p in CONFIGS}
    for family in ("llama3_8b", "tiny"):
        assert (family, "stage1_kowiki_lora.yaml") in names
        assert (family, "stage3_kolima_bilima_lora.yaml") in names
        assert (family, "stage1_kowiki_qlora_single_device.yaml") in names
    assert ("llama3_8b", "stage1_kowiki_lora_single_device.yaml") in names
    for family in ("llama3_8b", "tiny"):  # seeds 000 and 003
        assert (family, "translation_ko_zh_lora.yaml") in names
        assert (family, "alpaca_en_zh_lora.yaml") in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_components_resolve_and_accept_their_arguments(path: Path):
    cfg = OmegaConf.load(path)
    tt_config.validate(cfg)  # torchtune's own check of top-level components
    for _key, node in component_nodes(cfg):
        component = _get_component_from_path(node._component_)
        kwargs = {k: v for k, v in node.items() if k != "_component_"}
        inspect.signature(component).bind_partial(**kwargs)  # raises on an unknown argument


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_header_names_its_own_exact_command(path: Path):
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(REPO).as_posix()
    recipe = STAGE_COMMAND_BY_PATH.get(f"{path.parent.name}/{path.name}", STAGE_COMMAND[path.name])
    runner = "tune run" if path.parent.name == "llama3_8b" else "python -m tools.tune_cpu"
    assert any(
        line.lstrip("# ").startswith(runner) and recipe in line and f"--config {rel}" in line
        for line in text.splitlines()
    ), f"{rel}: header lacks '{runner} ... {recipe} --config {rel}'"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_dataset_in_the_config_builds_on_the_fixtures(path: Path, tmp_path: Path):
    cfg = OmegaConf.load(path)
    tok = make_llama3_tokenizer(max_seq_len=cfg.tokenizer.max_seq_len)
    built = []
    for node in dataset_nodes(cfg):
        node = on_fixtures(OmegaConf.to_container(node), tmp_path)
        ds = tt_config.instantiate(OmegaConf.create(node), tok)
        assert len(ds) > 0
        sample = ds[0]
        assert len(sample["tokens"]) == len(sample["labels"]) <= cfg.tokenizer.max_seq_len
        if node.get("packed") or node.get("pack"):
            assert isinstance(ds, PackedDataset)
        if node.get("pack"):  # torchtune's recipes honour collate_fn only when `packed` is unset
            assert cfg.get("collate_fn") in COLLATE_PATHS, f"{path}: pack: True without collate_fn"
            # a BlockMask for flex attention, document offsets for attention: cudnn
            assert (cfg.get("collate_fn") == VARLEN_COLLATE_PATH) == (cfg.model.get("attention") == "cudnn"), path
            assert not node.get("packed")
        built.append(ds)
    if len(built) > 1:
        assert ConcatDataset(built).packed == all(isinstance(d, PackedDataset) for d in built)


def on_fixtures(node: dict, tmp_path: Path, index: int = 0) -> dict:
    """The dataset node with its files pointed at the fixtures (recursively for mixed_dataset)."""
    if node["_component_"].endswith("mixed_dataset"):
        node.update(datasets=[on_fixtures(sub, tmp_path, i) for i, sub in enumerate(node["datasets"])])
    elif node["_component_"].endswith("parallel_dataset"):
        node.update(source="moses", data_files=str(ASSETS / "parallel" / "train"))
    elif node["_component_"].endswith("alpaca_dataset"):  # English first, Chinese second
        node.update(source="json", data_files=str(ASSETS / ("alpaca_en_tiny.jsonl", "alpaca_zh_tiny.jsonl")[index]))
    elif node["_component_"].endswith("pretokenized_dataset"):
        from kobllla.assets import llama3_tokenizer_model_path
        from kobllla.pretokenized import pretokenize

        pretokenize(source="csv", data_files=str(ASSETS / "kowiki_tiny.csv"), out_dir=tmp_path / "tokens",
                    tokenizer_path=llama3_tokenizer_model_path(), workers=1, progress=False)
        node.update(path=str(tmp_path / "tokens"))
    elif node["_component_"].endswith("kowikitext_dataset"):
        node.update(source="csv", data_files=str(ASSETS / "kowiki_tiny.csv"))
    elif node["_component_"].endswith("kolima_dataset"):
        node.update(data_files=str(ASSETS / "kolima_tiny.jsonl"))
    elif "source" in node and node.get("source") is not None:
        node.update(data_files=str(ASSETS / "bilima_paired.jsonl"))
    else:
        node.update(en_data_files=str(ASSETS / "lima_en_tiny.jsonl"), ko_data_files=str(ASSETS / "kolima_tiny.jsonl"))
    return node
