"""The all-to-all form of expert parallelism (`--tp 2 --ep --ep-dispatch all-to-all`) on cpu with gloo.

- The token-row ops (`reduce_scatter`, `shard_rows`, `all_gather_rows`, `all_to_all`, `ep_dispatch`,
  `ep_combine`, rdnac.ir.collectives) against a direct computation: over a real 2-rank gloo group, and
  without a group (rank 0 of W whose peers hold zeros: the shapes a GPU plan's program is recorded at).
- Whole models against the tp=1 plan of the same checkpoint (itself checked against transformers in
  test_qwen3_moe.py / test_gpt_oss.py): Qwen3-MoE (a dense layer between MoE layers) and GPT-OSS (router and
  expert biases, sinks): logits within 1e-5 at a prompt of 19 tokens (rows padded to 20), greedy tokens and
  their decode-step logprobs (batches of 4, 3, 2 and 1 sequences: odd ones padded) through the engine with
  several requests in flight. test_tensor_parallel.py compares the all-reduce form with tp=1 the same way.
- `rdnac inspect`: each collective, where it sits, the bytes it moves per token and rank and the formula.
- Bad input: one line each.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.errors import RdnacError, UnsupportedModelError
from rdnac.ir import collectives
from rdnac.ir.moe import moe_experts, moe_route
from rdnac.plans import read_plan
from tests.support.checkpoints import write_byte_tokenizer

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84]  # 19 tokens: odd
PROMPTS = [PROMPT, PROMPT[:5], PROMPT[4:15], [7, 299, 12]]
MAX_TOKENS = [10, 14, 6, 9]
ATOL = 1e-5
W = 2


# ---------------------------------------------------------------- the ops' references


def _expert_case(num_tokens=5, num_experts=4, top_k=2, hidden=4, inter=6):
    torch.manual_seed(0)
    x = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    weights, ids = moe_route(torch.randn(num_tokens, num_experts), top_k=top_k, scoring="softmax_topk")
    return x, weights, ids, w13, w2


def _rank_ops(rank: int, path: str) -> None:
    """One rank of a 2-rank gloo group: every token-row op on this rank's inputs, saved for the parent."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}.rendezvous", rank=rank, world_size=W)
    try:
        torch.manual_seed(1 + rank)
        x = torch.randn(5, 3)  # 5 rows: padded to 6, 3 per rank; different on each rank
        torch.manual_seed(7)
        x_all = torch.randn(5, 3)  # the same on every rank
        blocks = torch.arange(4 * 3, dtype=torch.float32).view(4, 3) + 100 * rank  # 2 blocks of 2 rows
        ids = (torch.arange(4, dtype=torch.int32).view(4, 1) + 10 * rank)
        x_m, weights, eids, w13, w2 = _expert_case()
        local = slice(rank * 3, (rank + 1) * 3)  # this rank's 3 of 6 padded token rows
        pad = lambda t: collectives._padded_rows(t, W)  # noqa: E731
        with collectives.use_group(dist.group.WORLD):
            out = {"x": x, "reduce_scatter": collectives.reduce_scatter(x, num_ranks=W),
                   "shard_rows": collectives.shard_rows(x_all, num_ranks=W),
                   "all_gather_rows": collectives.all_gather_rows(x[:3], torch.zeros(5), num_ranks=W),
                   "all_to_all": collectives.all_to_all(blocks, num_ranks=W),
                   "all_to_all_ids": collectives.all_to_all(ids, num_ranks=W)}
            send, send_ids, ones = collectives.ep_dispatch(pad(x_m)[local], pad(eids)[local], num_ranks=W,
                                                           experts_per_rank=2)
            recv, recv_ids = collectives.all_to_all(send, num_ranks=W), collectives.all_to_all(send_ids, num_ranks=W)
            slots = moe_experts(recv, ones, recv_ids, w13[2 * rank:2 * rank + 2], w2[2 * rank:2 * rank + 2],
                                act="silu")
            back = collectives.all_to_all(slots, num_ranks=W)
            rows = collectives.ep_combine(back, pad(weights)[local], pad(eids)[local], num_ranks=W,
                                          experts_per_rank=2)
            out["moe"] = collectives.all_gather_rows(rows, torch.zeros(5), num_ranks=W)
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_token_row_ops_over_gloo(tmp_path):
    """Each op on 2 real ranks against the direct computation: reduce_scatter = the rank's rows of the sum
    (5 rows padded to 6), all_gather_rows = the ranks' rows in order (padding dropped), all_to_all = block s
    from rank s, and dispatch -> experts -> back -> combine -> gather = moe_experts on all the tokens."""
    import torch.multiprocessing as mp

    path = str(tmp_path / "ops")
    mp.spawn(_rank_ops, args=(path,), nprocs=W)
    outs = [torch.load(f"{path}.{r}") for r in range(W)]
    total = collectives._padded_rows(outs[0]["x"] + outs[1]["x"], W)
    torch.manual_seed(7)
    x_all = collectives._padded_rows(torch.randn(5, 3), W)
    x_m, weights, ids, w13, w2 = _expert_case()
    full = moe_experts(x_m, weights, ids, w13, w2, act="silu")
    for r, out in enumerate(outs):
        rs = out["reduce_scatter"]
        assert rs.shape == (3, 3) and rs.dtype == torch.float32
        torch.testing.assert_close(rs, total[3 * r:3 * r + 3], atol=0, rtol=0)
        assert torch.equal(out["shard_rows"], x_all[3 * r:3 * r + 3])
        assert torch.equal(out["all_gather_rows"], torch.cat([outs[0]["x"][:3], outs[1]["x"][:3]])[:5])
        want = torch.cat([torch.arange(12.).view(4, 3)[2 * r:2 * r + 2],
                          (torch.arange(12.).view(4, 3) + 100)[2 * r:2 * r + 2]])
        assert torch.equal(out["all_to_all"], want)
        assert out["all_to_all_ids"].dtype == torch.int32
        assert out["all_to_all_ids"].flatten().tolist() == [2 * r, 2 * r + 1, 10 + 2 * r, 10 + 2 * r + 1]
        assert out["moe"].shape == full.shape
        err = (out["moe"] - full).abs().max().item()
        assert err <= 1e-6, f"rank {r}: max error {err:.3g}"


def test_token_row_ops_without_a_group():
    """No group: rank 0 of W whose peers hold zeros; shapes as the shape rules give them (symbols for T), and
    ep_dispatch's slots: x where the destination holds the expert, a zero row and -1 elsewhere."""
    from rdnac.ir.graph import TensorSpec
    from rdnac.ir.ops import OPS

    x = torch.randn(5, 3)
    rs = OPS["reduce_scatter"].reference(x, num_ranks=W)
    assert rs.shape == (3, 3) and torch.equal(rs, x[:3])
    assert torch.equal(OPS["shard_rows"].reference(x, num_ranks=3), x[:2])
    gathered = OPS["all_gather_rows"].reference(x[:3], torch.zeros(5), num_ranks=W)
    assert torch.equal(gathered, torch.cat([x[:3], torch.zeros(2, 3)]))
    assert torch.equal(OPS["all_to_all"].reference(x[:4], num_ranks=W), torch.cat([x[:2], torch.zeros(2, 3)]))
    ids = torch.tensor([[0, 3], [2, 1]], dtype=torch.int32)  # experts 0-1 on rank 0, 2-3 on rank 1
    send, send_ids, ones = OPS["ep_dispatch"].reference(x[:2], ids, num_ranks=W, experts_per_rank=2)
    assert send.shape == (8, 3) and send_ids.shape == (8, 1) and send_ids.dtype == torch.int32
    assert send_ids.flatten().tolist() == [0, -1, -1, 1, -1, 1, 0, -1]  # slot (d, t, j) = d*4 + t*2 + j
    assert torch.equal(send[[0, 3, 5, 6]], x[[0, 1, 0, 1]]) and not send[[1, 2, 4, 7]].any()
    assert torch.equal(ones, torch.ones(8, 1))
    back = torch.randn(8, 3)
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    combined = OPS["ep_combine"].reference(back, weights, ids, num_ranks=W, experts_per_rank=2)
    torch.testing.assert_close(combined, torch.stack([0.6 * back[0] + 0.4 * back[5], 0.7 * back[6] + 0.3 * back[3]]))
    spec = TensorSpec("float32", ("T", 64))
    assert OPS["reduce_scatter"].infer({"num_ranks": W}, [spec])[0].shape == ("ceil(T/2)", 64)
    assert OPS["reduce_scatter"].infer({"num_ranks": W}, [TensorSpec("float32", (7, 64))])[0].shape == (4, 64)
    outs = OPS["ep_dispatch"].infer({"num_ranks": W, "experts_per_rank": 2},
                                    [TensorSpec("float32", (4, 64)), TensorSpec("int32", (4, 2))])
    assert [o.shape for o in outs] == [(16, 64), (16, 1), (16, 1)]


# ---------------------------------------------------------------- whole models against tp=1


def _run(plan) -> tuple[torch.Tensor, list[list[int]], list[list[float]]]:
    llm = rdnac.load(plan)
    try:
        outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, logprobs=True) for n in MAX_TOKENS])
        return llm.logits(PROMPT), [o.token_ids for o in outs], [o.logprobs for o in outs]
    finally:
        llm.close()


def _check(plan, reference) -> None:
    logits, tokens, logprobs = _run(plan)
    ref_logits, ref_tokens, ref_logprobs = reference
    assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
    err = (logits - ref_logits).abs().max().item()
    assert err <= ATOL, f"{plan}: max logits error {err:.3g} (prefill of {len(PROMPT)} tokens)"
    assert tokens == ref_tokens
    err = max(abs(a - b) for lp, ref in zip(logprobs, ref_logprobs) for a, b in zip(lp, ref))
    assert err <= ATOL, f"{plan}: max logprob error {err:.3g} (decode steps)"


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from tests.test_qwen3_moe import make_qwen3_moe

    root = tmp_path_factory.mktemp("a2a_qwen3_moe")
    model = make_qwen3_moe(root / "ckpt", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=22,
                           norm_topk_prob=True, mlp_only_layers=[1])
    write_byte_tokenizer(root / "ckpt", model.config.vocab_size)
    one = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp1.msgpack")
    two = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp2.msgpack", tp=2, ep=True,
                        ep_dispatch="all-to-all")
    return root, two, _run(one)


def test_qwen3_moe_all_to_all_matches_one_rank(qwen3_moe):
    root, plan, reference = qwen3_moe
    p = read_plan(plan)
    graph = p.graph()
    ops = graph.op_counts()
    moe_layers = 2  # layers 0 and 2 (layer 1 is dense: its MLP stays column/row-parallel + all_reduce)
    assert ops["reduce_scatter"] == ops["ep_dispatch"] == ops["ep_combine"] == ops["all_gather_rows"] == moe_layers
    # both MoE layers' residuals come all-reduced (the embedding's, dense layer 1's): the rank takes its rows
    assert ops["all_to_all"] == 3 * moe_layers and ops["shard_rows"] == 2
    assert ops["all_reduce"] == 1 + 2  # embedding; the dense layer's o_proj and down_proj
    assert ops["shard_ids"] == 1 and "tp.expert_start" not in graph.weights  # the vocabulary's only
    assert graph.attrs["mesh"] == {"tp": 2, "ep": True, "ep_dispatch": "all-to-all"}
    experts = [n for n in graph.nodes if n.op == "moe_experts"]
    assert all(graph.weights[n.inputs[3]].shape == (4, 44, 44) for n in experts)  # 4 of 8 experts whole
    # the next layer's norm lost its residual input: the add runs on the rank's rows before the gather
    norm = next(n for n in graph.nodes if n.name == "layers.1.input_norm")
    assert norm.inputs == ["layers.0.moe_residual", "model.layers.1.input_layernorm.weight"]
    decision = next(d for d in p.body["decisions"] if d["node"] == "layers.0.experts" and "all-to-all" in d["action"])
    assert "--ep-dispatch all-to-all" in decision["reason"]
    _check(plan, reference)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from tests.support.gpt_oss import make_gpt_oss

    root = tmp_path_factory.mktemp("a2a_gpt_oss")
    make_gpt_oss(root / "ckpt", with_tokenizer=False, num_hidden_layers=2)
    return root, _run(rdnac.compile(root / "ckpt", target="cpu", output=root / "tp1.msgpack"))


def test_gpt_oss_all_to_all_matches_one_rank(gpt_oss):
    """GPT-OSS: router bias, expert biases (b2 added per slot, weighted where the token lives), sinks."""
    root, reference = gpt_oss
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "tp2.msgpack", tp=2, ep=True,
                         ep_dispatch="all-to-all")
    ops = read_plan(plan).graph().op_counts()
    # layer 1's residual is layer 0's rows already (its add before the gather): one shard_rows, after the embedding
    assert ops["all_to_all"] == 3 * 2 and ops["shard_rows"] == 1
    _check(plan, reference)


# ---------------------------------------------------------------- inspect


def test_inspect_shows_each_collective_and_its_bytes(qwen3_moe):
    from click.testing import CliRunner

    from rdnac.cli.inspect import summarize
    from rdnac.cli.main import cli

    root, plan, _ = qwen3_moe
    mesh = summarize(plan)["mesh"]
    assert mesh["ep_dispatch"] == "all-to-all"
    rows = {r["node"]: r for r in mesh["collectives"]}
    hidden, k = 44, 2
    rs = rows["layers.0.o_proj.reduce_scatter"]
    assert (rs["op"], rs["payload_bytes"], rs["per_rank_bytes"]) == ("reduce_scatter", hidden * 4, hidden * 4 // 2)
    assert rs["after"] == "layers.0.o_proj (linear)" and rs["formula"] == "(W-1)/W x row"
    a2a = rows["layers.0.experts.all_to_all"]
    assert (a2a["rows"], a2a["payload_bytes"], a2a["per_rank_bytes"]) == (k, k * hidden * 4, k * hidden * 4 // 2)
    assert a2a["after"] == "layers.0.experts.dispatch (ep_dispatch)"
    assert rows["layers.0.experts.all_to_all_ids"]["payload_bytes"] == k * 4
    assert rows["layers.0.experts.all_to_all_back"]["after"] == "layers.0.experts (moe_experts)"
    ag = rows["layers.2.experts.all_gather"]
    assert (ag["op"], ag["per_rank_bytes"], ag["after"]) == ("all_gather_rows", hidden * 2,
                                                             "layers.2.experts.residual (add)")
    assert rows["layers.1.down_proj.all_reduce"]["per_rank_bytes"] == hidden * 4  # 2(W-1)/W of a row
    assert mesh["per_rank_bytes_per_token"] == sum(r["per_rank_bytes"] for r in mesh["collectives"]
                                                   if r["per"] == "token")
    assert mesh["per_rank_bytes_per_token_by_op"]["all_to_all"] == 2 * (2 * k * hidden * 4 // 2 + k * 4 // 2)
    result = CliRunner().invoke(cli, ["inspect", str(plan)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--ep, all-to-all dispatch" in result.output
    assert "layers.{0, 2}.experts.all_to_all_back" in result.output
    assert "2 x 44 x float32 = 352" in result.output and "(W-1)/W x 2 slot rows (fixed capacity)" in result.output


# ---------------------------------------------------------------- bad input, one line each


def test_all_to_all_needs_ep_and_a_plain_moe_layer(qwen3_moe, tmp_path):
    from click.testing import CliRunner

    from rdnac.cli.main import cli
    from rdnac.compiler.pipeline import CompileOptions
    from tests.test_deepseek import make_deepseek

    root, _, _ = qwen3_moe
    with pytest.raises(RdnacError, match=r"^--ep-dispatch all-to-all requires --ep \(.*\); got --tp 2 without --ep; "
                                         r"add --ep$"):
        CompileOptions(tp=2, ep_dispatch="all-to-all")
    with pytest.raises(RdnacError, match=r"^--ep-dispatch requires one of all-reduce, all-to-all; got 'a2a'$"):
        CompileOptions(tp=2, ep=True, ep_dispatch="a2a")
    result = CliRunner().invoke(cli, ["compile", str(root / "ckpt"), "--tp", "2", "--ep-dispatch", "all-to-all",
                                      "-o", str(tmp_path / "x.msgpack"), "-q"])
    assert result.exit_code != 0 and "--ep-dispatch all-to-all requires --ep" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    # DeepSeek's shared expert reads the routed experts' input: the all-reduce form serves it
    make_deepseek(tmp_path / "ds", "deepseek_v3", q_lora_rank=22, n_group=4, topk_group=2, norm_topk_prob=True,
                  hidden_size=48, num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=14)
    with pytest.raises(UnsupportedModelError, match=r"^--tp 2 --ep: node 'layers.1.experts' \(moe_experts\) requires, "
                                                    r"for --ep-dispatch all-to-all, 'layers.1.post_norm' read by the "
                                                    r"router and the experts only .*; got it read by "
                                                    r"\['layers.1.shared_experts.gate_proj \(linear\)'.*; compile "
                                                    r"with --ep-dispatch all-reduce \(the default\) for this model$"):
        rdnac.compile(tmp_path / "ds", target="cpu", output=tmp_path / "x.msgpack", tp=2, ep=True,
                      ep_dispatch="all-to-all")
    assert not list(tmp_path.glob("x.*"))
