"""Claims about kobllla.checkpoint_io: reading every checkpoint layout a tensor slice at a time,
streaming shards whose headers are planned up front, atomic output directories."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kobllla.checkpoint_io import (
    INDEX_NAME,
    ShardedSafetensorsWriter,
    StreamingSafetensorsWriter,
    atomic_output_dir,
    meta_to_hf_name,
    open_checkpoint,
    plan_shards,
    read_safetensors_header,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),  # float32
        "lm_head.weight": torch.randn(10, 8, generator=g).to(torch.float16),
    }


def _write_streamed(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, slice_elems: int) -> list[Path]:
    shards = plan_shards([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_bytes=max_shard_bytes)
    writer = StreamingSafetensorsWriter(out, shards)
    for name in writer.order:
        flat = tensors[name].reshape(-1)
        for start in range(0, flat.numel(), slice_elems):
            writer.write(name, flat[start:start + slice_elems])
    return writer.close()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def test_streamed_shards_load_in_safetensors_with_every_bit_and_an_index(tmp_path: Path) -> None:
    tensors = _tensors()
    paths = _write_streamed(tmp_path, tensors, max_shard_bytes=200, slice_elems=7)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 160 + 128 + 32 + 160
    loaded = {}
    for p in paths:
        loaded.update(load_file(p))
    assert set(loaded) == set(tensors) == set(index["weight_map"])
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(_bits(loaded[name]), _bits(t))


def test_plan_puts_wider_dtypes_first_so_every_tensor_is_aligned() -> None:
    shards = plan_shards([("a", torch.bfloat16, (3,)), ("b", torch.float32, (2,)), ("c", torch.float64, (1,))],
                         max_shard_bytes=1000)
    assert len(shards) == 1 and shards[0].file_name == "model.safetensors"
    assert shards[0].names == ("c", "b", "a")
    header = json.loads(shards[0].header[8:])
    assert [header[n]["data_offsets"] for n in ("c", "b", "a")] == [[0, 8], [8, 16], [16, 22]]
    assert len(shards[0].header) % 8 == 0


def test_writer_refuses_tensors_out_of_planned_order(tmp_path: Path) -> None:
    shards = plan_shards([("a", torch.float32, (2,)), ("b", torch.float32, (2,))], max_shard_bytes=1000)
    writer = StreamingSafetensorsWriter(tmp_path, shards)
    with pytest.raises(ValueError, match="write order: got tensor 'b', expected 'a'"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 'b' and later were never written"):
        writer.close()


def test_buffered_writer_still_writes_single_file_and_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path / "one", max_shard_bytes=10**6)
    for n, t in tensors.items():
        writer.add(n, t)
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    with open_checkpoint(tmp_path / "one") as ck:
        assert torch.equal(_bits(ck.read_tensor("lm_head.weight")), _bits(tensors["lm_head.weight"]))


def test_sharded_and_single_file_checkpoints_read_the_same_tensors_and_slices(tmp_path: Path) -> None:
    tensors = _tensors(1)
    (tmp_path / "single").mkdir()
    save_file(tensors, str(tmp_path / "single" / "model.safetensors"))
    (tmp_path / "sharded").mkdir()
    _write_streamed(tmp_path / "sharded", tensors, max_shard_bytes=200, slice_elems=1000)
    with open_checkpoint(tmp_path / "single") as one, open_checkpoint(tmp_path / "sharded") as many:
        assert len(one.files) == 1 and len(many.files) == 3
        assert {n: (i.dtype, i.shape) for n, i in one.tensors.items()} == \
               {n: (i.dtype, i.shape) for n, i in many.tensors.items()}
        buf = torch.empty(64, dtype=torch.uint8)
        part = many.read_slice("model.embed_tokens.weight", 13, 9, buf)
        assert torch.equal(_bits(part), _bits(tensors["model.embed_tokens.weight"].reshape(-1)[13:22]))
        with pytest.raises(ValueError, match=r"slice \[75, 85\) is outside its 80 elements"):
            many.read_slice("model.embed_tokens.weight", 75, 10, buf)


def test_truncated_safetensors_file_is_refused_naming_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: tensor \S+ ends at byte \d+ but the file has"):
        read_safetensors_header(path)
    os.truncate(path, 5)
    with pytest.raises(ValueError, match="too short for a safetensors file"):
        read_safetensors_header(path)


def test_bytes_after_the_last_tensor_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(ValueError, match="4 bytes after the last tensor's data"):
        read_safetensors_header(path)


def test_header_with_wrong_span_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match=r"tensor w: data_offsets span 8 bytes but F32\[3\] needs 12"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_or_a_stale_map_is_refused(tmp_path: Path) -> None:
    _write_streamed(tmp_path, _tensors(), max_shard_bytes=200, slice_elems=1000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    name = "model.layers.0.input_layernorm.weight"  # shares shard 2 with q_proj
    assert index["weight_map"][name] == "model-00002-of-00003.safetensors"
    index["weight_map"][name] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"holds tensor {name} but {INDEX_NAME} maps it to "
                                         "'model-00001-of-00003.safetensors'; the index is stale"):
        open_checkpoint(tmp_path)
    index["weight_map"][name] = "model-00002-of-00003.safetensors"
    index["weight_map"]["model.embed_tokens.weight"] = "model-00003-of-00003.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor model.embed_tokens.weight is mapped to "
                                         "model-00003-of-00003.safetensors but that file does not hold it"):
        open_checkpoint(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="lists model-00002-of-00003.safetensors, which is missing"):
        open_checkpoint(tmp_path)


def test_directory_without_weights_says_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights in .*expected model.safetensors"):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")


def test_torchtune_output_dir_is_refused_with_the_epoch_to_pass(tmp_path: Path) -> None:
    for e in (0, 1, 10):
        (tmp_path / f"epoch_{e}").mkdir()
    with pytest.raises(FileNotFoundError, match=r"torchtune output dir; pass one of its epochs, e.g. .*epoch_10 "
                                                r"\(found: epoch_0, epoch_1, epoch_10\)"):
        open_checkpoint(tmp_path)


def _meta_from_hf(hf: dict[str, torch.Tensor], *, heads: int, kv_heads: int, dim: int) -> dict[str, torch.Tensor]:
    """HF -> Meta through torchtune's own converters (independent of the code under test)."""
    from torchtune.models.convert_weights import hf_to_tune, tune_to_meta

    return tune_to_meta(hf_to_tune(hf, num_heads=heads, num_kv_heads=kv_heads, dim=dim))


def test_meta_consolidated_pth_reads_as_hf_names_with_q_k_rows_back_in_hf_order(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    dim, heads, kv_heads = 8, 2, 1
    hf = {
        "model.embed_tokens.weight": torch.randn(10, dim, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(dim, dim, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, dim, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(dim, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(dim, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(10, dim, generator=g).to(torch.bfloat16),
    }
    meta = _meta_from_hf(hf, heads=heads, kv_heads=kv_heads, dim=dim)
    assert "layers.0.attention.wq.weight" in meta
    assert not torch.equal(meta["layers.0.attention.wq.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    torch.save(meta, tmp_path / "consolidated.00.pth")
    params = {"dim": dim, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": 1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "torch-meta"
        assert set(ck.tensors) == set(hf)
        for name, t in hf.items():
            assert torch.equal(_bits(ck.read_tensor(name)), _bits(t)), name


def test_meta_pth_without_params_json_is_refused(tmp_path: Path) -> None:
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(FileNotFoundError, match="Meta-format weights need params.json"):
        open_checkpoint(tmp_path)


def test_model_parallel_consolidated_shards_are_refused(tmp_path: Path) -> None:
    for i in range(2):
        torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / f"consolidated.0{i}.pth")
    with pytest.raises(ValueError, match="2 model-parallel consolidated.\\*.pth shards"):
        open_checkpoint(tmp_path)


class _NotATensor:
    pass


def test_pickle_holding_arbitrary_objects_is_never_unpickled(tmp_path: Path) -> None:
    torch.save({"model.norm.weight": torch.zeros(2), "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot load as a weights-only torch checkpoint"):
        open_checkpoint(tmp_path)


def test_unknown_meta_name_is_refused_naming_the_known_ones() -> None:
    assert meta_to_hf_name("layers.7.feed_forward.w2.weight", source=Path("x")) == "model.layers.7.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="tensor layers.0.adapter.weight is not a Llama tensor in Meta's naming"):
        meta_to_hf_name("layers.0.adapter.weight", source=Path("x"))


def test_atomic_output_dir_removes_temporary_left_by_a_killed_run(tmp_path: Path) -> None:
    dead = tmp_path / ".out.tmp-999999999"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not dead.exists()
    assert (tmp_path / "out" / "x").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_refuses_existing_output_and_cleans_up_on_error(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pick another output or pass --overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "new"):
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hf_named_torch_pickle_reads_like_safetensors(tmp_path: Path) -> None:
    tensors = _tensors(4)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert ck.format == "torch-hf"
        assert list(ck.tensors) == list(tensors)
        for name, t in tensors.items():
            assert torch.equal(_bits(ck.read_tensor(name)), _bits(t))


def test_sequential_hasher_gives_the_file_sha256_whatever_order_bytes_arrive_in(tmp_path: Path) -> None:
    import hashlib

    from kobllla.checkpoint_io import SequentialHasher

    data = os.urandom(100_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    in_order = SequentialHasher(path, prime=10)
    for start in range(10, len(data), 7_000):
        in_order.feed(start, memoryview(data[start:start + 7_000]))
    assert in_order.pos == len(data) and in_order.finish() == want
    shuffled = SequentialHasher(path)
    shuffled.feed(50_000, memoryview(data[50_000:60_000]))  # ahead of position: ignored
    shuffled.feed(0, memoryview(data[:20_000]))
    shuffled.feed(0, memoryview(data[:20_000]))  # behind position: ignored
    assert shuffled.pos == 20_000 and shuffled.finish() == want


def test_sequential_hasher_fed_in_turn_by_many_threads_gives_the_file_sha256(tmp_path: Path) -> None:
    import hashlib
    import random
    import threading

    from kobllla.checkpoint_io import SequentialHasher

    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    hasher = SequentialHasher(path, prime=8)
    slices = [(start, min(start + 3_001, len(data))) for start in range(8, len(data) - 5_000, 3_001)]
    assert all(hasher.claim(a, b - a) for a, b in slices)
    assert not hasher.claim(0, 8)  # not where the claimed bytes end: left for finish()
    threads = [threading.Thread(target=hasher.feed_in_turn, args=(a, memoryview(data[a:b]))) for a, b in slices]
    random.Random(0).shuffle(threads)  # they arrive out of order; each waits for its turn
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert hasher.pos == slices[-1][1]  # every claimed byte hashed, none read twice
    assert hasher.finish() == hashlib.sha256(data).hexdigest()
    abandoned = SequentialHasher(path)
    assert abandoned.claim(0, 10) and abandoned.claim(10, 10)
    abandoned.abandon()  # the slice at 0 failed: the one at 10 must not wait for it
    abandoned.feed_in_turn(10, memoryview(data[10:20]))
    assert abandoned.finish() == hashlib.sha256(data).hexdigest()
