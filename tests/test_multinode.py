"""Past one machine: ``lora_finetune_distributed`` as two torchrun nodes, on this machine.

Two ``torch.distributed.run`` agents (``--nnodes 2 --node_rank 0/1``, one process each) meet
through a c10d rendezvous on 127.0.0.1 and train the tiny model over gloo (the CPU bridge), as
two hosts of a SLURM job would (``docs/slurm/stage1_multinode.sbatch``). The same config then
runs as one node with two processes (``tools.tune_cpu --nproc_per_node 2``): the two-node run
must form one world of two ranks, log the same losses and save the same files and weights.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kobllla.corpora import constitution_articles, write_text_csv
from kobllla.demo._pipeline import logged_losses
from tests.conftest import REPO

pytestmark = pytest.mark.integration

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_args(out: Path, base: Path, corpus: Path) -> list[str]:
    return ["lora_finetune_distributed", "--config", "configs/tiny/stage1_kowiki_lora.yaml", f"output_dir={out}",
            f"checkpointer.checkpoint_dir={base}", f"tokenizer.path={base}/original/tokenizer.model",
            f"dataset.data_files={corpus}", "epochs=1", f"max_steps_per_epoch={STEPS}"]


def two_nodes(args: list[str], logs: Path) -> list[int]:
    """Two torchrun agents, node ranks 0 and 1, one worker each; returns their exit codes."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "kobllla-multinode-test", "--rdzv-conf", f"is_host={int(rank == 0)}",
               "-m", "kobllla.cpu_bridge", *args]
        with open(logs / f"node{rank}.log", "w") as log:  # LOGLEVEL=INFO: the agents log the rendezvous
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "LOGLEVEL": "INFO"}))
    try:
        return [p.wait(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode")
    corpus = write_text_csv(root / "ko.csv", constitution_articles()[:12], repeat=6)
    codes = two_nodes(recipe_args(root / "two-nodes", tiny_base, corpus), root)
    assert codes == [0, 0], "\n".join((root / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    one = subprocess.run([sys.executable, "-m", "tools.tune_cpu", "--nproc_per_node", "2",
                          *recipe_args(root / "one-node", tiny_base, corpus)],
                         cwd=REPO, capture_output=True, text=True, timeout=420)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    return {"root": root, "two": root / "two-nodes", "one": root / "one-node", "base": tiny_base}


def rendezvous_result(log: str) -> dict[str, str]:
    """The fields of the agent's "Rendezvous complete for workers. Result:" lines (LOGLEVEL=INFO)."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if "Rendezvous complete for workers. Result:" in line)
    fields = {}
    for line in lines[start + 1:]:
        found = re.search(r"\]\s+(\w+)=(.*)$", line)
        if not found:
            break
        fields[found.group(1)] = found.group(2)
    return fields


def test_two_nodes_rendezvous_as_one_world_of_two_ranks(runs):
    results = [rendezvous_result((runs["root"] / f"node{rank}.log").read_text()) for rank in (0, 1)]
    for r in results:
        assert (r["group_world_size"], r["local_ranks"], r["global_world_sizes"]) == ("2", "[0]", "[2]")
        assert (r["master_addr"], r["master_port"]) == (results[0]["master_addr"], results[0]["master_port"])
    assert sorted(r["global_ranks"] for r in results) == ["[0]", "[1]"]  # one worker per node, one world


def test_two_nodes_train_the_same_losses_as_two_processes_on_one_node(runs):
    two, one = dict(logged_losses(runs["two"])), dict(logged_losses(runs["one"]))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, two, one)


def test_two_nodes_save_the_same_checkpoint_as_two_processes(runs):
    """Same files, same adapter and merged weights as the 2-process run (whose HF checkpoint
    test_recipes_integration checks against torchtune's logits)."""
    two, one = runs["two"] / "epoch_0", runs["one"] / "epoch_0"
    names = sorted(p.name for p in one.iterdir() if p.is_file())
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == names
    assert "adapter_model.safetensors" in names and "config.json" in names
    weights = [n for n in names if n.endswith(".safetensors")]
    assert len(weights) >= 2  # the adapter and the merged model
    for file in weights:
        a, b = load_file(two / file), load_file(one / file)
        assert a.keys() == b.keys() and a, file
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    base = load_file(runs["base"] / "model.safetensors")
    trained = load_file(str(next(two.glob("model-*.safetensors"))))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[name].float(), base[name].float())  # the merged LoRA changed the weights
