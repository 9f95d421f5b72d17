"""Tensor and expert parallelism of DeepSeek-V3's FP8 block experts (`moe_experts_fp8_block`: bits and one float32
scale per 128x128 block, as the native checkpoints store them) on cpu with gloo, against the tp=1 plan.

The checkpoint is the tests' tiny DeepSeek-V3 (tests/test_deepseek.py's generator, quantized into the native
layout by rdnac.testing.deepseek) at widths where every split falls on the 128x128 blocks: 8 MLA heads of
32 + 32 (4 per rank: 256 q_b rows, 256 kv_b rows, 128 o_proj columns), intermediate sizes 256 (128 per rank)
for the dense first layer, the shared expert and the 8 routed experts; two layers, the second MoE.

- `--tp 2`: every expert's gate/up rows and down columns in blocks of 128, their scale rows / columns with them.
  The down projection's input is quantized per token and 128 columns: on a rank, its 128-column slice is one
  of one rank's groups, so each rank quantizes exactly what one rank does and the partial sums add up to the
  tp=1 sum up to float32 order of addition (on the op's reference, same inputs: within 1e-5 of its outputs'
  size; a split off the groups is off by FP8 rounding, so it is refused in one line).
- `--tp 2 --ep`: experts 0-3 / 4-7 whole per rank with their scales; routed ids of the other rank's experts are
  -1 (shard_ids) and skipped, by the reference and by the fused MoE kernels' sort and top-k sum.
- Whole plans, both forms: logits within 1e-5 of tp=1 (O(1) logits: the checkpoint is not decisive) and the
  same greedy tokens with several requests in flight. Why two layers with the MoE last: an FP8 activation
  quantization is a step function, so a float32 reassociation upstream of one (the all_reduce of partial
  sums, the order the ranks' experts are added in) can move one activation across a rounding boundary and
  change the output by a rounding step, not an ulp. With a third layer (a second MoE layer) the --ep plan's
  first expert sum differs from tp=1's by 7e-7 (as the --tp plan's does), the second MoE layer's input then by
  5e-5 (--tp: 6e-7): one FP8 rounding in the layer between them went the other way, and the logits differ by
  4.3e-5 at one of 20 positions (seed 0; 5e-7 elsewhere). A property of FP8 activations under any
  reassociation, not of the split, which the op-level test checks on identical inputs.
- sm90 plans of one MoE layer (float32) under the Triton interpreter, ranks over gloo: the same checks; the
  sharded plans cross-compile for gfx942 (FNUZ: bits reinterpreted, scales doubled, then sharded) and
  gfx1201 as single-rank ones do. `-m gpu`: the sm90 plans on two GPUs with graphs.
"""

from __future__ import annotations

import math

import pytest
import torch

import rdnac
from rdnac.errors import UnsupportedModelError
from rdnac.plans import read_plan
from tests.test_tensor_parallel import ATOL, _check_sharded, _reference
from tests.test_tensor_parallel_gpu import _run as run_plan

# 128-aligned per rank at tp=2 (see the module docstring); the rest as test_deepseek.py's "v3" case
FP8_V3 = dict(q_lora_rank=32, kv_lora_rank=32, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
              hidden_size=64, num_attention_heads=8, num_key_value_heads=8, qk_nope_head_dim=32, qk_rope_head_dim=32,
              v_head_dim=32, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2)
FORMS = pytest.mark.parametrize("ep", [False, True], ids=["tp", "tp-ep"])
EXPERTS = "model.layers.1.mlp.experts"  # the stacked weights' prefix: .w13, .w13_scale, .w2, .w2_scale


def write_fp8_v3(directory, *, decisive: bool = False, **overrides):
    """The tiny DeepSeek-V3 in the native FP8 block layout in `directory`/ckpt (the float one beside it)."""
    from rdnac.testing.deepseek import write_fp8_block_checkpoint
    from tests.test_deepseek import make_deepseek

    make_deepseek(directory / "float", "deepseek_v3", decisive=decisive, **{**FP8_V3, **overrides})
    write_fp8_block_checkpoint(directory / "float", directory / "ckpt", seed=0)
    return directory / "ckpt"


def _name(ep: bool) -> str:
    return "tp2ep" if ep else "tp2"


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_fp8_experts")
    ckpt = write_fp8_v3(root)
    plans = {name: rdnac.compile(ckpt, target="cpu", output=root / f"{name}.msgpack", quiet=True, **options)
             for name, options in (("tp1", {}), ("tp2", dict(tp=2)), ("tp2ep", dict(tp=2, ep=True)))}
    return root, plans, _reference(plans["tp1"])


@FORMS
def test_fp8_block_experts_match_one_rank(cpu, ep):
    _, plans, reference = cpu
    _check_sharded(plans[_name(ep)], reference)


def test_fp8_block_experts_layout(cpu):
    """--tp: rank 1 keeps rows [128, 256) of gate and of up (scale rows 1 and 3 of [gate 0, gate 1, up 0, up 1])
    and down's columns [128, 256) (scale column 1); --ep: experts 4-7 whole with their scales, its ids from
    shard_ids. Decisions say so."""
    _, plans, _ = cpu
    full = read_plan(plans["tp1"]).load_weights()
    w13, s13, w2, s2 = (f"{EXPERTS}.{w}" for w in ("w13", "w13_scale", "w2", "w2_scale"))
    assert full[s13].shape == (8, 4, 1) and full[s2].shape == (8, 1, 2)
    u8 = lambda t: t.view(torch.uint8)  # noqa: E731 -- FP8 bits compared bit for bit
    tp = read_plan(plans["tp2"])
    for r, w in enumerate(tp.load_weights(rank=r) for r in range(2)):
        mine = slice(r * 128, (r + 1) * 128)
        assert torch.equal(u8(w[w13]), u8(torch.cat([full[w13][:, mine], full[w13][:, 256:][:, mine]], 1)))
        assert torch.equal(w[s13], full[s13][:, [r, 2 + r]])
        assert torch.equal(u8(w[w2]), u8(full[w2][:, :, mine])) and torch.equal(w[s2], full[s2][:, :, r:r + 1])
    said = {d["node"]: d["action"] for d in tp.body["decisions"] if d["pass"] == "shard"}
    assert "with their scale blocks; down's input quantized in the same 128-column groups" in said["layers.1.experts"]
    ep = read_plan(plans["tp2ep"])
    w1 = ep.load_weights(rank=1)
    assert torch.equal(u8(w1[w13]), u8(full[w13][4:])) and torch.equal(u8(w1[w2]), u8(full[w2][4:]))
    assert torch.equal(w1[s13], full[s13][4:]) and torch.equal(w1[s2], full[s2][4:])
    graph = ep.graph()
    experts = next(n for n in graph.nodes if n.op == "moe_experts_fp8_block")
    producer = next(n for n in graph.nodes if experts.inputs[2] in n.outputs)
    assert producer.op == "shard_ids" and producer.attrs["size"] == 4
    assert torch.equal(w1["tp.expert_start"], torch.tensor([4]))


def _columns(weights, lo: int, hi: int, inter: int, bn: int = 128):
    """w13, its scales, w2, its scales of the intermediate columns [lo, hi) (gate rows lo..hi and the matching up
    rows; the scale blocks they touch, a block cut by the slice too)."""
    w13, s13, w2, s2 = weights
    blocks = list(range(lo // bn, math.ceil(hi / bn)))
    return (w13[:, [*range(lo, hi), *range(inter + lo, inter + hi)]].contiguous(),
            s13[:, [*blocks, *(inter // bn + b for b in blocks)]].contiguous(),
            w2[:, :, lo:hi].contiguous(), s2[:, :, blocks].contiguous())


def test_splits_are_exact_on_the_same_inputs(cpu):
    """On the op's reference (what the cpu plan runs), the same inputs on every rank: the two ranks' partial sums
    add up to the one-rank output within float32 order of addition, --tp (each rank quantizes the same 128-column
    groups of the intermediate as one rank) and --ep (each rank's experts whole, the other rank's ids -1 from
    shard_ids). A split at 192 (rank 0's second group 64 wide, rank 1's 64 columns cut from one rank's second
    group) quantizes other groups and is off by FP8 rounding, which is why the shard pass refuses a split off the
    128 boundaries."""
    from rdnac.ir.collectives import shard_ids
    from rdnac.ir.moe import moe_experts_fp8_block

    _, plans, _ = cpu
    node = next(n for n in read_plan(plans["tp1"]).graph().nodes if n.op == "moe_experts_fp8_block")
    names = node.inputs[3:7]
    full = read_plan(plans["tp1"]).load_weights()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(16)]).to(torch.int32)
    rw = torch.softmax(torch.randn(16, 3, generator=g), -1)
    attrs = {k: node.attrs[k] for k in ("act", "fp8_format", "act_scheme", "block_size")}
    whole = moe_experts_fp8_block(x, rw, ids, *(full[w] for w in names), **attrs)
    size = whole.abs().max().item()

    def split_error(parts, rank_ids=(ids, ids)) -> float:
        total = sum(moe_experts_fp8_block(x, rw, i, *p, **attrs) for p, i in zip(parts, rank_ids))
        return (total - whole).abs().max().item()

    for form in ("tp2", "tp2ep"):
        ranks = [read_plan(plans[form]).load_weights(rank=r) for r in range(2)]
        rank_ids = [shard_ids(ids, w["tp.expert_start"], size=4) for w in ranks] if form == "tp2ep" else (ids, ids)
        err = split_error([[w[n] for n in names] for w in ranks], rank_ids)
        assert err <= 1e-5 * size, f"{form}: {err:.3g} (outputs up to {size:.3g})"
    weights = [full[w] for w in names]
    off = split_error([_columns(weights, 0, 192, 256), _columns(weights, 192, 256, 256)])
    assert off > 1e-3 * size, f"a split at 192 should differ by FP8 rounding; {off:.3g} (outputs up to {size:.3g})"


def test_intermediate_off_the_scale_blocks_is_refused(tmp_path):
    """Experts of intermediate size 128 at --tp 2: 64 columns per rank, half a scale block; one line, nothing
    written. --ep places the same experts whole and compiles (the shared expert, 2 x 128, splits at 128)."""
    ckpt = write_fp8_v3(tmp_path, moe_intermediate_size=128, n_shared_experts=2)
    with pytest.raises(UnsupportedModelError, match=r"^--tp 2: node 'layers.1.experts' \(moe_experts_fp8_block\) "
                       r"has FP8 block-scaled experts \(128x128 blocks, one scale each\) of intermediate size 128 "
                       r"split into 64 per rank; each rank must keep whole blocks .* choose a --tp that divides 128 "
                       r"into multiples of 128, or --ep") as e:
        rdnac.compile(ckpt, target="cpu", output=tmp_path / "x.msgpack", quiet=True, tp=2)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("x.*"))
    plan = read_plan(rdnac.compile(ckpt, target="cpu", output=tmp_path / "ep.msgpack", quiet=True, tp=2, ep=True))
    assert plan.graph().weights[f"{EXPERTS}.w13"].shape == (4, 256, 64)


# ---------------------------------------------------------------- GPU targets: sm90 interpreted, AMD cross-compiled


LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
PROMPTS = [[3, 141, 59, 26, 53, 58, 97, 93], [7, 200, 12]]
MAX_TOKENS = [5, 4]


def _gpu_plans(root, target: str, forms, **options) -> dict:
    """{tp1 / tp2 / tp2ep: plan} of one MoE layer (the first: first_k_dense_replace 0) for `target`."""
    ckpt = root / "ckpt"
    if not ckpt.exists():
        write_fp8_v3(root, num_hidden_layers=1, first_k_dense_replace=0, decisive=options.get("dtype") != "float32")
    return {name: rdnac.compile(ckpt, target=target, output=root / f"{target}-{name}.msgpack", quiet=True,
                                **({"tp": 2, "ep": name == "tp2ep"} if name != "tp1" else {}), **LIMITS, **options)
            for name in forms}


def _run(plan, **load) -> tuple[torch.Tensor, list[list[int]], bool]:
    return run_plan(plan, prompts=PROMPTS, max_tokens=MAX_TOKENS, num_blocks=16, **load)


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_fp8_experts_sm90")
    plans = _gpu_plans(root, "sm90", ("tp1", "tp2", "tp2ep"), dtype="float32")
    return plans, _run(plans["tp1"], interpret=True)


@FORMS
def test_sm90_fp8_block_experts_interpreted_over_gloo(sm90, ep):
    """The plans' own kernels under the Triton interpreter (activations quantized per 128 columns by fp8_quant,
    the block-scaled grouped GEMMs over the rank's 128-wide blocks or its 4 whole experts, the device sort
    dropping the other rank's ids), in float32: logits within 1e-5 of the tp=1 plan's, the same greedy tokens."""
    plans, (ref, ref_tokens, _) = sm90
    graph = read_plan(plans[_name(ep)]).graph()
    experts = next(n for n in graph.nodes if n.op == "moe_experts_fp8_block")
    assert graph.weights[experts.inputs[3]].shape == ((4, 512, 64) if ep else (8, 256, 64))
    logits, tokens, _ = _run(plans[_name(ep)], interpret=True)
    err = (logits - ref).abs().max().item()
    assert err <= ATOL, f"max logits error {err:.3g}"
    assert tokens == ref_tokens and all(tokens)


@pytest.mark.parametrize("target", ["gfx942", "gfx1201"])
def test_sharded_fp8_block_plans_cross_compile_for_amd_targets(tmp_path, target):
    """Both forms build for the target as the single-rank plan does (every node a kernel per step key, within the
    target's LDS and without spills: `build.check_resources`); gfx942's experts are e4m3fnuz with doubled scales,
    sharded after the conversion. Cost on 2 cores from a cold kernel cache: 72 s gfx942, 54 s gfx1201 (warm: 13 s, 3 s; the --ep plan
    reuses most of the --tp plan's binaries: the kernels specialize on divisibility, not on E or I)."""
    from rdnac.compiler.build import check_resources
    from rdnac.plans.binaries import KernelBinary

    plans = _gpu_plans(tmp_path, target, ("tp2", "tp2ep"))
    cpu = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "cpu.msgpack", quiet=True)
    full = read_plan(cpu).load_weights()
    for name, path in plans.items():
        plan = read_plan(path)
        graph, program = plan.graph(), plan.body["program"]
        assert plan.num_ranks == 2 and plan.header["target"] == target and plan.header["mesh"]["ep"] is (name == "tp2ep")
        binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
        assert all(check_resources(b, target) == [] for b in binaries)
        assert "_moe_fp8_block_gemm_kernel" in {b.kernel.split(":")[1] for b in binaries}
        for node in graph.nodes:
            if node.op != "split":
                keys = program[node.name]
                assert keys and all(c["kernel"] for c in keys.values()), (name, node.name)
        experts = next(n for n in graph.nodes if n.op == "moe_experts_fp8_block")
        fmt = "e4m3fnuz" if target == "gfx942" else "e4m3fn"
        assert experts.attrs["fp8_format"] == fmt and graph.weights[experts.inputs[3]].dtype == f"float8_{fmt}"
        w1, s13 = plan.load_weights(rank=1), experts.inputs[4]
        mine = full[s13][4:] if name == "tp2ep" else full[s13][:, [1, 3]]
        assert torch.equal(w1[s13], mine * (2 if fmt == "e4m3fnuz" else 1)), name


@pytest.mark.gpu
@FORMS
def test_sm90_fp8_block_experts_on_two_gpus_with_graphs(tmp_path, ep):
    """bf16 plans of a decisive checkpoint on GPUs 0 and 1 over NCCL, decode graphs captured with the expert sort,
    the FP8 grouped GEMMs and the all_reduce inside: the tp=1 plan's greedy tokens, logits within bf16 rounding
    (the partial sums are rounded to bf16 before the all_reduce)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    plans = _gpu_plans(tmp_path, "sm90", ("tp1", _name(ep)))
    (ref, ref_tokens, _), (logits, tokens, graphs) = (_run(plans[n], device="cuda") for n in ("tp1", _name(ep)))
    assert tokens == ref_tokens and graphs, "tokens differ or decode graphs were not captured"
    err = (logits - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), f"max logits error {err:.3g}"
