"""Tensor and expert parallelism on cpu with gloo: sharded plans against the plan of one rank.

The reference is the tp=1 plan of the same checkpoint (itself checked against transformers in
test_models_hf.py / test_qwen3_moe.py): logits within 1e-5, the same greedy tokens, through the engine
with several requests in flight (the serving path). The dense model has GQA 8/2, so tp=2 splits the KV
heads and tp=4 keeps one KV head per rank shared by two ranks; its vocabulary (302) is padded to 304 at
tp=4. Each plan's ranks are real processes (`rdnac.runtime.distributed`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.errors import PlanError, RdnacError, RequestError, UnsupportedModelError
from rdnac.plans import read_plan
from tests.support.checkpoints import make_checkpoint, write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
PROMPTS = [PROMPT, PROMPT[:5], PROMPT[4:15], [7, 299, 12]]  # 299: in the last rank's block
MAX_TOKENS = [10, 14, 6, 9]
ATOL = 1e-5
DENSE = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=136,
             vocab_size=302, tie_word_embeddings=True)


def _generate(llm) -> list[list[int]]:
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
    return [o.token_ids for o in outs]


def _reference(plan) -> tuple[torch.Tensor, list[list[int]]]:
    llm = rdnac.load(plan)
    return llm.logits(PROMPT), _generate(llm)


def _check_sharded(plan, reference) -> None:
    logits, tokens = reference
    llm = rdnac.load(plan)
    try:
        ours = llm.logits(PROMPT)
        assert ours.shape == logits.shape and ours.dtype == torch.float32
        err = (ours - logits).abs().max().item()
        assert err <= ATOL, f"{plan}: max logits error {err:.3g} > {ATOL}"
        assert _generate(llm) == tokens
    finally:
        llm.close()


def test_collective_references_one_rank():
    """Without a group (or with one rank) the collectives are the identity; shard_ids maps global ids to the
    rank's rows, -1 elsewhere, which embedding turns into zero rows and moe_experts skips."""
    from rdnac.ir import collectives
    from rdnac.ir.ops import OPS, embedding
    from rdnac.ir.moe import moe_experts

    x = torch.randn(3, 5)
    assert OPS["all_reduce"].reference(x) is x
    assert torch.equal(OPS["all_gather"].reference(x, size=4), x[:, :4])
    ids = torch.tensor([0, 4, 5, 9, 10])
    local = collectives.shard_ids(ids, torch.tensor([5]), size=5)
    assert local.dtype == ids.dtype and local.tolist() == [-1, -1, 0, 4, -1]
    table = torch.randn(5, 3)
    out = embedding(local, table)
    assert out.shape == (5, 3) and not out[[0, 1, 4]].any()
    assert torch.equal(out[2], table[0]) and torch.equal(out[3], table[4])
    w13, w2 = torch.randn(2, 8, 3), torch.randn(2, 3, 4)
    h = torch.randn(2, 3)
    weights, every = torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    only_0 = torch.tensor([[0, -1], [-1, 0]], dtype=torch.int32)  # expert 1 on another rank
    full = moe_experts(h, weights, every, w13, w2, act="silu")
    part0 = moe_experts(h, weights, only_0, w13, w2, act="silu")
    part1 = moe_experts(h, weights, torch.tensor([[-1, 0], [0, -1]], dtype=torch.int32), w13[1:], w2[1:], act="silu")
    torch.testing.assert_close(part0 + part1, full, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_dense")
    make_checkpoint("qwen3", root / "ckpt", **DENSE)
    plans = {tp: rdnac.compile(root / "ckpt", target="cpu", output=root / f"tp{tp}.msgpack", tp=tp)
             for tp in (1, 2, 4)}
    return root, plans, _reference(plans[1])


@pytest.mark.parametrize("tp", [2, 4])
def test_dense_gqa_matches_one_rank(dense, tp):
    _, plans, reference = dense
    _check_sharded(plans[tp], reference)


def test_dense_plan_layout(dense):
    """One graph, per-rank weights files holding only their slices; the collectives where the pass puts
    them; KV state of the rank's heads; inspect lists the collectives and their bytes per token."""
    from rdnac.cli.inspect import summarize

    root, plans, _ = dense
    full, plan = read_plan(plans[1]), read_plan(plans[4])
    graph = plan.graph()
    assert plan.num_ranks == 4 and plan.header["mesh"]["ep"] is False
    files = [root / r["file"] for r in plan.header["mesh"]["ranks"]]
    assert [f.name for f in files] == [f"tp4.rank{r}.weights.safetensors" for r in range(4)]
    assert all(f.stat().st_size < full.weights_path.stat().st_size / 2 for f in files)
    ops = graph.op_counts()
    assert ops["all_reduce"] == 1 + 2 * graph.attrs["num_layers"] and ops["all_gather"] == 1
    assert all(s.shape == (1, 8) for s in graph.state)  # 2 KV heads over 4 ranks: one each
    w0 = plan.load_weights(rank=0)
    w3 = plan.load_weights(rank=3)
    ref = full.load_weights()
    emb = "model.embed_tokens.weight"
    assert w0[emb].shape == (76, 64) and torch.equal(w0[emb], ref[emb][:76])
    assert torch.equal(w3[emb][:74], ref[emb][228:]) and not w3[emb][74:].any()  # zero padding rows
    assert torch.equal(w3["tp.vocab_start"], torch.tensor([228]))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    # rank 3: query heads 6-7, KV head 1 (query heads 4-7 read it), rows [q | k | v]
    want = torch.cat([ref[qkv][48:64], ref[qkv][64 + 8:64 + 16], ref[qkv][80 + 8:80 + 16]])
    assert torch.equal(w3[qkv], want)
    s = summarize(plans[4])
    assert s["mesh"]["tp"] == 4
    reduce_rows = [r for r in s["mesh"]["collectives"] if r["op"] == "all_reduce"]
    assert {r["payload_bytes"] for r in reduce_rows} == {64 * 4}
    assert s["mesh"]["all_reduce_bytes_per_token"] == len(reduce_rows) * 256
    assert any(r["after"].startswith("layers.0.o_proj") for r in reduce_rows)


def test_biases_tp2(tmp_path):
    """Qwen2's q/k/v biases are sharded with their rows; a separate (unmerged) q/k/v takes the same path."""
    make_checkpoint("qwen2", tmp_path / "ckpt", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=96)
    one = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "tp1.msgpack",
                        disable_passes=("merge_linears",))
    two = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "tp2.msgpack", tp=2,
                        disable_passes=("merge_linears",))
    assert read_plan(two).graph().op_counts().get("split") is None
    ref = rdnac.load(one).logits(PROMPT)
    llm = rdnac.load(two)
    try:
        err = (llm.logits(PROMPT) - ref).abs().max().item()
        assert err <= ATOL, err
    finally:
        llm.close()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from tests.test_qwen3_moe import make_qwen3_moe

    root = tmp_path_factory.mktemp("tp_moe")
    model = make_qwen3_moe(root / "ckpt", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=22,
                           norm_topk_prob=True, mlp_only_layers=[1])
    write_byte_tokenizer(root / "ckpt", model.config.vocab_size)
    one = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp1.msgpack")
    return root, _reference(one)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_moe_matches_one_rank(moe, ep):
    root, reference = moe
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / f"tp2{'ep' if ep else ''}.msgpack", tp=2,
                         ep=ep)
    graph = read_plan(plan).graph()
    experts = [n for n in graph.nodes if n.op == "moe_experts"]
    w13 = graph.weights[experts[0].inputs[3]].shape
    assert w13 == ((4, 44, 44) if ep else (8, 22, 44))  # ep: 4 whole experts; tp: each expert's half
    assert (graph.op_counts().get("shard_ids", 0) == 1 + len(experts)) if ep else \
        (graph.op_counts()["shard_ids"] == 1)
    _check_sharded(plan, reference)


MXFP4_MOE = dict(hidden_size=64, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                 norm_topk_prob=True)


@pytest.fixture(scope="module")
def moe_mxfp4(tmp_path_factory):
    from tests.test_qwen3_moe import make_qwen3_moe

    root = tmp_path_factory.mktemp("tp_moe_mxfp4")
    model = make_qwen3_moe(root / "ckpt", **MXFP4_MOE)
    write_byte_tokenizer(root / "ckpt", model.config.vocab_size)
    one = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp1.msgpack", quantize="mxfp4")
    return root, _reference(one)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_mxfp4_experts_match_one_rank(moe_mxfp4, ep):
    """MXFP4 experts (--quantize mxfp4): blocks and scales sliced together (--tp: w2's I in whole scale blocks
    of 32) or placed whole (--ep); the tp=1 plan's MXFP4 experts are the reference."""
    root, reference = moe_mxfp4
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / f"tp2{'ep' if ep else ''}.msgpack", tp=2, ep=ep,
                         quantize="mxfp4")
    graph = read_plan(plan).graph()
    experts = next(n for n in graph.nodes if n.op == "moe_experts_mxfp4")
    w2_blocks, w2_scales = (graph.weights[w].shape for w in experts.inputs[5:7])
    assert (w2_blocks, w2_scales) == (((2, 64, 32), (2, 64, 2)) if ep else ((4, 64, 16), (4, 64, 1)))
    _check_sharded(plan, reference)


# ---------------------------------------------------------------- bad input, one line each


def test_tp_that_does_not_divide(dense, tmp_path):
    root, _, _ = dense
    with pytest.raises(UnsupportedModelError, match=r"--tp 3: node 'layers.0.attn' \(attention\) has 8 query "
                                                    r"heads; --tp must divide them"):
        rdnac.compile(root / "ckpt", target="cpu", output=tmp_path / "x.msgpack", tp=3)
    make_checkpoint("qwen3", tmp_path / "odd", **{**DENSE, "intermediate_size": 66})
    with pytest.raises(UnsupportedModelError, match=r"has intermediate size 66; --tp must divide it"):
        rdnac.compile(tmp_path / "odd", target="cpu", output=tmp_path / "x.msgpack", tp=4)
    make_checkpoint("qwen3", tmp_path / "kv4", **{**DENSE, "hidden_size": 48, "num_attention_heads": 12,
                                                 "num_key_value_heads": 4, "head_dim": 4, "intermediate_size": 48})
    with pytest.raises(UnsupportedModelError, match=r"has 4 KV heads; --tp must divide them, or be a multiple of "
                                                    r"them"):
        rdnac.compile(tmp_path / "kv4", target="cpu", output=tmp_path / "x.msgpack", tp=6)
    # --ep on a GPU target is no longer refused (the fused MoE kernels drop other ranks' experts): its options
    # validate here; test_tensor_parallel_gpu.py builds --ep plans for gfx942 and gfx1201 and runs sm90 ones
    from rdnac.compiler.pipeline import CompileOptions

    assert CompileOptions(target="gfx942", tp=2, ep=True).ep
    with pytest.raises(RdnacError, match=r"--ep requires --tp N with N > 1"):
        rdnac.compile(root / "ckpt", target="cpu", output=tmp_path / "x.msgpack", ep=True)
    assert not list(tmp_path.glob("x.*"))


def test_wrong_number_of_ranks(dense):
    import torch.distributed as dist

    from rdnac.runtime.model_runner import ModelRunner

    _, plans, _ = dense
    with pytest.raises(RequestError, match=r"a --tp 2 plan requires 2 ranks; got 1"):
        ModelRunner.load(plans[2])
    # under torchrun with another --nproc-per-node: the group exists with the wrong size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RdnacError, match=r"a --tp 4 plan requires 4 ranks; got 1 \(torchrun"):
            rdnac.load(plans[4])
    finally:
        dist.destroy_process_group()


def test_verify_refuses_a_sharded_plan(dense):
    from rdnac.cli.verify import verify_plan

    root, plans, _ = dense
    with pytest.raises(RdnacError, match=r"rdnac verify requires a plan of one rank .* got a --tp 2 plan"):
        verify_plan(plans[2], root / "ckpt")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_rank_weights(dense, tmp_path):
    root, plans, _ = dense
    for f in root.glob("tp2.*"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "tp2.rank1.weights.safetensors").unlink()
    with pytest.raises(PlanError, match=r"requires rank 1's weights file .*tp2.rank1.weights.safetensors .*missing"):
        rdnac.load(tmp_path / "tp2.msgpack")


def test_dead_rank_takes_the_group_down(dense):
    _, plans, _ = dense
    llm = rdnac.load(plans[2])
    try:
        llm.runner.processes[0].kill()
        llm.runner.processes[0].wait()
        with pytest.raises(RdnacError, match=r"^tensor-parallel group of 2 ranks is down: rank 1 \(exit code -9\) "
                                             r"stopped \((Connection|Read error)[^\n]*; restart rdnac$"):
            llm.generate([PROMPT], SamplingParams(max_tokens=3))
    finally:
        llm.close()


def test_cli_compile_and_run(dense, tmp_path):
    """`rdnac compile --tp 2` then `rdnac run`, which starts rank 1 itself: the tokens of the tp=1 plan."""
    from click.testing import CliRunner

    from rdnac.cli.main import cli

    root, plans, _ = dense
    result = CliRunner().invoke(cli, ["compile", str(root / "ckpt"), "--tp", "2", "-o", str(tmp_path / "p.msgpack"),
                                      "-q"])
    assert result.exit_code == 0, result.output
    out = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "run", str(tmp_path / "p.msgpack"), "--prompt",
                          "hello", "--max-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reference = rdnac.load(plans[1]).generate(["hello"], SamplingParams(max_tokens=6))[0].text
    assert out.stdout.strip() == reference.strip() and reference.strip()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from tests.support.gpt_oss import make_gpt_oss

    root = tmp_path_factory.mktemp("tp_gpt_oss")
    make_gpt_oss(root / "ckpt", with_tokenizer=False, num_hidden_layers=2)
    one = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp1.msgpack")
    return root, rdnac.load(one).logits(PROMPT)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_gpt_oss_sinks_and_biases(gpt_oss, ep):
    """GPT-OSS: attention sinks sliced by query head, o_proj and expert down biases added once, expert gate/up
    biases sliced (--tp) or placed (--ep), a vocabulary of 301 padded to 302."""
    root, ref = gpt_oss
    two = rdnac.compile(root / "ckpt", target="cpu", output=root / f"tp2{'ep' if ep else ''}.msgpack", tp=2, ep=ep)
    llm = rdnac.load(two)
    try:
        ours = llm.logits(PROMPT)
        assert ours.shape == ref.shape == (len(PROMPT), 301)
        err = (ours - ref).abs().max().item()
        assert err <= ATOL, f"max logits error {err:.3g} (logits up to {ref.abs().max().item():.3g})"
    finally:
        llm.close()


def test_inspect_text_shows_collectives(dense):
    from click.testing import CliRunner

    from rdnac.cli.main import cli

    _, plans, _ = dense
    result = CliRunner().invoke(cli, ["inspect", str(plans[2])], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "tensor parallel: 2 ranks" in result.output and "tp2.rank0.weights.safetensors" in result.output
    assert "layers.{0-1}.o_proj.all_reduce" in result.output and "logits.all_gather" in result.output
    assert "64 x float32 = 256" in result.output  # one hidden row of float32 per token


def test_torchrun(dense):
    """Under torchrun the ranks join its group: rank 0 generates, rank 1 serves it and exits with it."""
    _, plans, _ = dense
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    out = subprocess.run([*torchrun, "-m", "rdnac.cli.main", "run", str(plans[2]), "--prompt", "hello",
                          "--max-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reference = rdnac.load(plans[1]).generate(["hello"], SamplingParams(max_tokens=6))[0].text
    assert out.stdout.strip() == reference.strip()


# ---------------------------------------------------------------- publishing a sharded plan


def _fail_saving_rank1(monkeypatch, out):
    from rdnac.plans import format as plan_format

    real, calls = plan_format.save_file, []

    def second_fails(tensors, path, metadata=None):  # rank 0's file is written; the disk fills on rank 1's
        calls.append(path)
        real(tensors, path, metadata=metadata)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(plan_format, "save_file", second_fails)


def _fail_renaming(target):
    def inject(monkeypatch, out):
        from rdnac.plans import format as plan_format

        real = os.replace
        final = out if target == "plan" else out.with_name(out.name.replace(".msgpack", f".{target}.weights"
                                                                                        ".safetensors"))

        def refuse(src, dst):  # every file renamed before this one is in place when it fails
            if os.fspath(dst) == os.fspath(final):
                raise OSError(28, "No space left on device")
            real(src, dst)
        monkeypatch.setattr(plan_format.os, "replace", refuse)
    return inject


PUBLISH_FAILURES = {"saving rank 1": _fail_saving_rank1, "renaming rank 1": _fail_renaming("rank1"),
                    "renaming the plan": _fail_renaming("plan")}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing"])
@pytest.mark.parametrize("stage", list(PUBLISH_FAILURES))
def test_a_failed_sharded_write_publishes_nothing(dense, tmp_path, monkeypatch, stage, existing):
    """The plan and every rank's weights file are published together: a failure at any stage leaves no new
    file (no temporaries, no rank sidecar beside an old plan) and an existing plan loading as it was."""
    from rdnac.plans import write_plan

    root, plans, _ = dense
    src = read_plan(plans[2])
    ranks = [src.load_weights(rank=r) for r in range(2)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tp2.msgpack"
    if existing:
        for f in root.glob("tp2.*"):
            shutil.copy(f, out_dir / f.name)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    changed = [{k: v + 1 if v.is_floating_point() else v for k, v in w.items()} for w in ranks]
    PUBLISH_FAILURES[stage](monkeypatch, out)
    with pytest.raises(PlanError, match=r"nothing was written \(an existing plan is unchanged\)") as e:
        write_plan(out, src.header, src.body, changed[0], rank_weights=changed)
    assert "\n" not in str(e.value) and "No space left on device" in str(e.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before, sorted(p.name for p in out_dir.iterdir())
    if existing:
        old = read_plan(out)
        for r in range(2):
            loaded = old.load_weights(rank=r)
            assert all(torch.equal(loaded[k], ranks[r][k]) for k in ranks[r])


def test_step_commands_carry_only_the_steps_tokens():
    """Rank 0 broadcasts each step; an entry carries its step's tokens only (indexed by position), so a decode
    command at a long context is as small as at a short one, and the runner reads the same tokens."""
    import pickle

    from rdnac.runtime.distributed import wire_entries
    from rdnac.runtime.model_runner import StepEntry

    long, short = list(range(100_000)), list(range(10))
    sizes = []
    for tokens in (long, short):
        entry = StepEntry(tokens, [0, 1, 2], len(tokens) - 1, len(tokens), state_slot=3)
        (sent,) = pickle.loads(pickle.dumps(wire_entries([entry])))
        assert sent.token_ids[sent.start:sent.end] == tokens[-1:] and sent.state_slot == 3
        sizes.append(len(pickle.dumps(wire_entries([entry]))))
    assert sizes[0] - sizes[1] < 16 and sizes[0] < 400, sizes
    prefill = StepEntry(long[:50], [0], 20, 50)
    (sent,) = wire_entries([prefill])
    assert sent.token_ids[20:50] == long[20:50]
