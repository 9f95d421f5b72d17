"""The runtime allocates and budgets the model state a plan declares (`Graph.state`), and nothing else;
`rdnac inspect` shows it."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import msgpack
import pytest
import torch
from click.testing import CliRunner

import rdnac
from rdnac.cli.main import cli
from rdnac.errors import RequestError
from rdnac.runtime.llm_engine import LLMEngine
from rdnac.runtime.model_runner import ModelRunner
from rdnac.runtime.sequence import Sequence
from tests.support.checkpoints import make_checkpoint

EXTRA_STATE = [  # what a hybrid linear-attention model would add: per-sequence state of odd shapes and dtypes
    {"name": "ssm.0", "kind": "recurrent", "layer": 0, "dtype": "float16", "shape": [3, 5]},
    {"name": "conv.1", "kind": "conv", "layer": 1, "dtype": "float32", "shape": [7]},
]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    make_checkpoint("llama", d / "ckpt")
    return rdnac.compile(d / "ckpt", target="cpu", output=d / "llama.msgpack", quiet=True)


def _edited(plan, tmp_path, edit):
    """A copy of `plan` whose body's graph dict went through `edit` (body hash kept valid)."""
    doc = msgpack.unpackb(plan.read_bytes(), raw=False)
    body = msgpack.unpackb(doc["body"], raw=False, strict_map_key=False)
    edit(body["graph"])
    doc["body"] = msgpack.packb(body, use_bin_type=True)
    doc["body_sha256"] = hashlib.sha256(doc["body"]).hexdigest()
    out = tmp_path / plan.name
    out.write_bytes(msgpack.packb(doc, use_bin_type=True))
    shutil.copy(plan.with_name(doc["header"]["weights"]["file"]), tmp_path)
    return out


def _expected_shape(spec: dict, num_blocks: int, block_size: int, num_slots: int) -> tuple:
    if spec["kind"] in ("paged_kv", "paged_latent"):
        return (num_blocks, block_size, *spec["shape"])
    return (num_slots, *spec["shape"])


def test_compiled_plan_allocates_exactly_its_declared_state(plan):
    llm = rdnac.load(plan, num_blocks=7)
    graph, cache = llm.graph, llm.runner.cache
    a = graph.attrs
    assert len(graph.state) == 2 * a["num_layers"]  # one K and one V per layer, paged per token
    assert {s.name for s in graph.state} == set(cache.tensors)
    for spec in graph.state:
        t = cache.tensors[spec.name]
        assert spec.kind == "paged_kv" and spec.shape == (a["num_kv_heads"], a["head_dim"])
        assert t.shape == (7, llm.runner.block_size, *spec.shape) and t.dtype == getattr(torch, spec.dtype)
    per_token = 2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"] * getattr(torch, a["dtype"]).itemsize
    assert llm.runner.bytes_per_block == llm.runner.block_size * per_token and llm.runner.bytes_per_sequence == 0
    assert cache.nbytes == 7 * llm.runner.bytes_per_block
    assert llm.engine.block_manager.num_slots == 0


def test_allocation_and_budget_follow_a_different_declared_state(plan, tmp_path):
    def edit(graph):
        # states beside the model's K/V caches, each with the graph input it feeds (a plan whose state and
        # inputs disagree, or whose nodes read a cache of a dtype they cannot, is refused at load): a paged
        # state of another dtype and shape than the model's, and the per-sequence states of a hybrid model
        extra = [{"name": "latent.1", "kind": "paged_latent", "layer": 1, "dtype": "bfloat16", "shape": [4, 3, 2]},
                 *EXTRA_STATE]
        graph["state"] += extra
        for spec in extra:
            prefix = ["NB", "BS"] if spec["kind"].startswith("paged") else ["NS"]
            graph["inputs"][spec["name"]] = {"dtype": spec["dtype"], "shape": [*prefix, *spec["shape"]]}

    edited = _edited(plan, tmp_path, edit)
    runner = ModelRunner.load(edited)
    specs = msgpack.unpackb(msgpack.unpackb(edited.read_bytes(), raw=False)["body"], raw=False)["graph"]["state"]
    llm = LLMEngine(runner, max_num_seqs=2, num_blocks=5)
    cache = runner.cache
    assert set(cache.tensors) == {s["name"] for s in specs}
    for spec in specs:
        t = cache.tensors[spec["name"]]
        assert t.shape == _expected_shape(spec, 5, runner.block_size, 2), spec
        assert t.dtype == getattr(torch, spec["dtype"]), spec
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    paged = sum(math.prod(s["shape"]) * itemsize[s["dtype"]] for s in specs if s["kind"].startswith("paged"))
    assert runner.bytes_per_block == runner.block_size * paged
    assert runner.bytes_per_sequence == 3 * 5 * 2 + 7 * 4

    # two state slots: the scheduler runs at most two sequences, and a finished one hands its slot on
    bm = llm.block_manager
    assert bm.num_slots == 2 and bm.num_free_slots == 2
    seqs = [Sequence(f"s{i}", [5, 6, 7]) for i in range(3)]
    for seq in seqs:
        llm.scheduler.add(seq)
    chunks = llm.scheduler.schedule()
    assert [c.seq for c in chunks] == seqs[:2] and {s.state_slot for s in seqs[:2]} == {0, 1}
    assert seqs[2].state_slot == -1 and bm.num_free_slots == 0 and len(llm.scheduler.waiting) == 1
    llm.scheduler.update(chunks)
    seqs[1].token_ids.append(9)  # its sampled token, as LLMEngine.step appends it
    slot = seqs[0].state_slot
    llm.scheduler.finish(seqs[0])
    llm.scheduler.schedule()
    assert seqs[2].state_slot == slot and bm.num_free_slots == 0

    with pytest.raises(RequestError, match="per-sequence state"):
        LLMEngine(runner, enable_prefix_caching=True)

    # inspect shows the declared state and sizes it for a given memory
    result = CliRunner().invoke(cli, ["inspect", str(edited), "--json", "--memory", "2MiB"])
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)["state"]
    assert [{k: e[k] for k in ("name", "kind", "layer", "dtype", "shape")} for e in state["entries"]] == specs
    weights = json.loads(result.stdout)["weights"]["bytes"]
    assert state["bytes_per_token"] == paged and state["bytes_per_sequence"] == runner.bytes_per_sequence
    slots = runner.max_num_seqs
    assert state["sequence_slots"] == slots and state["memory_bytes"] == 2 << 20
    assert state["max_concurrent_tokens"] == ((2 << 20) - weights - slots * runner.bytes_per_sequence) // paged
    text = CliRunner().invoke(cli, ["inspect", str(edited), "--memory", "2MiB"])
    assert text.exit_code == 0 and "recurrent" in text.output and "per sequence" in text.output
