"""FP8 quantization fusions: `rms_norm_quant`, `gated_act_quant`, `linear_fp8` "prequantized", and the
passes `fuse_norm_quant` / `fuse_act_quant` that build them.

Kernels run under the Triton interpreter. A fused kernel must write the same fp8 bytes and scales as
the unfused kernels it replaces (the norm or activation kernel, then the linear's `_quant_fp8_kernel`)
and as `quantize_rows` applied to the unfused kernel's output; against the float reference it is
close (the unfused norm/activation kernels themselves differ from torch by bf16 ulps). The passes are
checked on small hand-built graphs (what fuses, what is kept and why, bit-identical in the reference
interpreter) and on a tiny FP8 model: fused for sm90, gfx1201 and gfx942, not for gfx1151 (a16w8);
fusion on vs off gives the same logits for the cpu plan (bit for bit) and for GPU plans under
`--interpret`.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.compiler.passes import CompileState, fuse_act_quant, fuse_norm_quant
from rdnac.compiler.record import RecordingLauncher
from rdnac.ir import interpreter, ops
from rdnac.ir.fp8 import FORMATS, FP8_MAX, quantize_rows
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec
from rdnac.ir.verify import verify
from rdnac.kernels import activation, activation_quant, fp8_quant, gemm_fp8, rms_norm, rms_norm_quant
from rdnac.kernels.launch import InterpretLauncher, JitLauncher
from rdnac.runtime.llm import LLM
from rdnac.runtime.model_runner import ModelRunner
from rdnac.testing.fp8 import write_random_checkpoint
from tests.test_kernels_gemm_fp8 import _operands

INTERPRET = InterpretLauncher()
FORMATS_ = ["e4m3fn", "e4m3fnuz"]
# (width, tile): one tile holding a partial last group; several tiles with a partial last one
SHAPES = [(300, 512), (700, 256)]
PASSES = ("fuse_norm_quant", "fuse_act_quant")
PROMPT = [(37 * i) % 990 + 5 for i in range(12)]


def _assert_same_quant(what, q, scale, q_ref, scale_ref, is_kernel=True, max_flips=0.0):
    """Equal scales, and equal fp8 bytes (a kernel's) or values (`quantize_rows` may write -0, which
    the kernels store as +0: its bits are NaN in e4m3fnuz). `max_flips`: the fraction of bytes that may
    sit one FP8 code away (a GPU sum of squares in another order moves a norm output by one bf16 ulp)."""
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype, f"{what}: q {q.shape} {q.dtype}"
    assert scale.shape == scale_ref.shape and scale.dtype == torch.float32, f"{what}: scale {scale.shape}"
    assert torch.equal(scale, scale_ref), f"{what}: scales differ by up to {(scale - scale_ref).abs().max():.3g}"
    differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)) if is_kernel else (q.float() != q_ref.float())
    num_diff = int(differ.sum())
    assert num_diff <= max_flips * q.numel(), f"{what}: {num_diff} fp8 {'bytes' if is_kernel else 'values'} differ"
    if num_diff:
        steps = (q.view(torch.uint8)[differ].int() - q_ref.view(torch.uint8)[differ].int()).abs()
        assert int(steps.max()) == 1, f"{what}: fp8 bytes differ by up to {int(steps.max())} codes"


def _assert_close_to_reference(what, q, scale, y_ref, group):
    """Dequantized fp8 within half an FP8 step (2**-4 relative) plus a few bf16 ulps (2**-8 relative
    each; the interpreter's bf16 casts of the sum, the normalized value and the product may each be off
    by one)."""
    s = scale.repeat_interleave(group, 1)[:, : q.shape[1]] if group else scale
    deq, y_ref = q.float() * s, y_ref.float()
    err = (deq - y_ref).abs()
    # 2**-8 of the scale: the FP8 subnormal step (2**-9 e4m3fn, 2**-10 fnuz, in units of the scale), with margin
    bound = (2.0 ** -4 + 4 * 2.0 ** -8) * y_ref.abs() + s * 2.0 ** -8
    assert (err <= bound).all(), f"{what}: max abs error {err.max():.3g} ({(err > bound).sum()} over bound)"


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("fmt", FORMATS_)
@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("H,block_h", SHAPES)
def test_rms_norm_quant_matches_unfused_kernels(fmt, group, has_residual, H, block_h):
    g = torch.Generator().manual_seed(H + group)
    x = torch.randn(5, H, generator=g).to(torch.bfloat16) * 3  # [T, H]; row 2 is zero (scale 1)
    residual = torch.randn(5, H, generator=g).to(torch.bfloat16)
    x[2] = 0
    residual[2] = 0
    weight = torch.randn(H, generator=g).to(torch.bfloat16)
    ins = (x, residual, weight) if has_residual else (x, weight)
    cfg = {"constexprs": {"BLOCK_H": block_h}, "num_warps": 2, "num_stages": 1}
    fused = rms_norm_quant.rms_norm_quant(*ins, eps=1e-6, fp8_format=fmt, group=group, config=cfg, launcher=INTERPRET)
    norm_cfg = {"constexprs": {"BLOCK_H": block_h, "BLOCK_HEADS": 1}, "num_warps": 2, "num_stages": 1}
    unfused = rms_norm.rms_norm(*ins, eps=1e-6, config=norm_cfg, launcher=INTERPRET)
    y = unfused[0] if has_residual else unfused
    what = f"rms_norm_quant {fmt} group={group} residual={has_residual} H={H} BLOCK_H={block_h}"
    assert len(fused) == 2 + has_residual
    _assert_same_quant(what + " vs norm + _quant_fp8_kernel", fused[0], fused[1],
                       *fp8_quant.quantize_activations(y, None, fmt, group, launcher=INTERPRET))
    _assert_same_quant(what + " vs quantize_rows(norm kernel)", fused[0], fused[1], *quantize_rows(y, fmt, group),
                       is_kernel=False)
    if has_residual:
        assert torch.equal(fused[2], unfused[1]), f"{what}: residual sums differ"
        # one bf16 ulp: the interpreter's fp32 -> bf16 cast need not round to nearest as torch does
        sum_err = (fused[2].float() - (x + residual).float()).abs().max().item()
        assert sum_err <= 2 ** -7 * (x + residual).float().abs().max().item(), f"{what}: residual sum off by {sum_err}"
    ref = ops.rms_norm_quant(*ins, eps=1e-6, fp8_format=fmt, group=group)
    assert [t.shape for t in ref] == [t.shape for t in fused] and [t.dtype for t in ref] == [t.dtype for t in fused]
    _assert_close_to_reference(what, fused[0], fused[1], ops.rms_norm(*ins, eps=1e-6) if not has_residual
                               else ops.rms_norm(*ins, eps=1e-6)[0], group)


@pytest.mark.parametrize("H,has_residual", [(4096, True), (700, False)])
def test_rms_norm_quant_chunks_match_one_program_per_token(H, has_residual):
    """CHUNK columns per program (decode sizes) write the bits of one program per token."""
    g = torch.Generator().manual_seed(H)
    x = torch.randn(3, H, generator=g).to(torch.bfloat16) * 3
    residual, weight = torch.randn(3, H, generator=g).to(torch.bfloat16), torch.randn(H, generator=g).to(torch.bfloat16)
    x[1], residual[1] = 0, 0
    ins = (x, residual, weight) if has_residual else (x, weight)
    whole = 1 << (H - 1).bit_length()
    one = rms_norm_quant.rms_norm_quant(*ins, eps=1e-6, fp8_format="e4m3fn", group=128, launcher=INTERPRET,
                                        config={"constexprs": {"BLOCK_H": whole}, "num_warps": 2, "num_stages": 1})
    for chunk in (128, 512):
        cfg = {"constexprs": {"BLOCK_H": whole, "CHUNK": chunk}, "num_warps": 2, "num_stages": 1}
        chunked = rms_norm_quant.rms_norm_quant(*ins, eps=1e-6, fp8_format="e4m3fn", group=128, config=cfg,
                                                launcher=INTERPRET)
        assert torch.equal(chunked[0].view(torch.uint8), one[0].view(torch.uint8)), f"H={H} CHUNK={chunk}: fp8 bytes"
        assert all(torch.equal(a, b) for a, b in zip(chunked[1:], one[1:])), f"H={H} CHUNK={chunk}: scales/sum"
    decode = rms_norm_quant.default_config({"H": 4096, "group": 128, "M": 1})
    assert decode["constexprs"].get("CHUNK") and decode in rms_norm_quant.config_space({"H": 4096, "group": 128})
    assert rms_norm_quant.default_config({"H": 4096, "group": 128, "M": 2048})["constexprs"]["CHUNK"] > decode[
        "constexprs"]["CHUNK"]


@pytest.mark.parametrize("variant", ["unit_offset", "float32_weight", "float32"])
def test_rms_norm_quant_rounds_like_rms_norm(variant):
    # y is rounded to the dtype rms_norm writes: x's with unit_offset, float32 for a float32 weight.
    g = torch.Generator().manual_seed(1)
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    x, residual = torch.randn(3, 384, generator=g).to(dtype), torch.randn(3, 384, generator=g).to(dtype)
    weight = torch.randn(384, generator=g).to(torch.bfloat16 if variant == "unit_offset" else torch.float32)
    weight = weight.to(dtype) if variant == "float32" else weight
    unit_offset = variant == "unit_offset"
    for group, block_h in ((0, 128), (128, 512)):
        fused = rms_norm_quant.rms_norm_quant(x, residual, weight, eps=1e-5, unit_offset=unit_offset,
                                              fp8_format="e4m3fn", group=group, launcher=INTERPRET,
                                              config={"constexprs": {"BLOCK_H": block_h}, "num_warps": 1,
                                                      "num_stages": 1})
        y, _ = rms_norm.rms_norm(x, residual, weight, eps=1e-5, unit_offset=unit_offset, launcher=INTERPRET,
                                 config={"constexprs": {"BLOCK_H": block_h, "BLOCK_HEADS": 1}, "num_warps": 1,
                                         "num_stages": 1})
        _assert_same_quant(f"{variant} group={group}", fused[0], fused[1], *quantize_rows(y, "e4m3fn", group),
                           is_kernel=False)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # gelu_tanh's exp(2z) saturates on purpose
@pytest.mark.parametrize("fmt", FORMATS_)
@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("is_merged", [False, True])
@pytest.mark.parametrize("I,block_i", SHAPES)
def test_gated_act_quant_matches_unfused_kernels(fmt, group, is_merged, I, block_i):
    g = torch.Generator().manual_seed(I + group)
    gate_up = (torch.randn(5, 2 * I + 8, generator=g) * 3).to(torch.bfloat16)[:, : 2 * I]  # strided rows
    gate_up[2] = 0
    ins = (gate_up,) if is_merged else (gate_up[:, :I], gate_up[:, I:])
    act = ("silu", "gelu", "gelu_tanh")[(I // 100 + group // 128 + is_merged) % 3]
    cfg = {"constexprs": {"BLOCK_I": block_i}, "num_warps": 2, "num_stages": 1}
    q, scale = activation_quant.gated_act_quant(*ins, act=act, fp8_format=fmt, group=group, config=cfg,
                                                launcher=INTERPRET)
    y = activation.gated_act(*ins, act=act, config=cfg, launcher=INTERPRET)
    what = f"gated_act_quant {act} {fmt} group={group} merged={is_merged} I={I} BLOCK_I={block_i}"
    _assert_same_quant(what + " vs gated_act + _quant_fp8_kernel", q, scale,
                       *fp8_quant.quantize_activations(y, None, fmt, group, launcher=INTERPRET))
    _assert_same_quant(what + " vs quantize_rows(gated_act kernel)", q, scale, *quantize_rows(y, fmt, group),
                       is_kernel=False)
    q_ref, scale_ref = ops.gated_act_quant(*ins, act=act, fp8_format=fmt, group=group)
    assert q_ref.shape == q.shape and q_ref.dtype == q.dtype and scale_ref.shape == scale.shape
    _assert_close_to_reference(what, q, scale, ops.gated_act(*ins, act=act), group)


@pytest.mark.parametrize("family,width", [(rms_norm_quant, 4096), (rms_norm_quant, 700), (activation_quant, 12288),
                                          (activation_quant, 300)])
@pytest.mark.parametrize("group", [0, 128])
def test_config_spaces_hold_whole_groups(family, width, group):
    problem = {"H" if family is rms_norm_quant else "I": width, "group": group, "dtype": "bfloat16"}
    space = family.config_space(problem)
    assert family.default_config(problem) in space
    key = "BLOCK_H" if family is rms_norm_quant else "BLOCK_I"
    assert all(c["constexprs"][key] >= max(group, 1) and c["constexprs"][key] % max(group, 1) == 0 for c in space)


@pytest.mark.parametrize("variant", ["token_channel", "token_tensor", "block", "block_token", "channel_group"])
def test_linear_fp8_prequantized_matches_dynamic(variant):
    """Given x's fp8 values and scales, every GEMM variant (split-K included) computes exactly what it
    computes when it quantizes x itself; the references agree bit for bit too."""
    M, N, K = 7, 384, 512
    for fmt, split_k in (("e4m3fn", 1), ("e4m3fnuz", 4)):
        x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, fmt)
        group = attrs["block_size"][1] if attrs["act_scheme"] == "dynamic_group" else 0
        pre = dict(attrs, act_scheme="prequantized", group=group, out_dtype="bfloat16")
        x_q, x_scale = quantize_rows(x, fmt, group)
        config = gemm_fp8._config(16, 64, 128, 1, split_k, 4, 2)
        dynamic = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=INTERPRET)
        out = gemm_fp8.linear_fp8(x_q, weight, weight_scale, x_scale, *rest, **pre, config=config, launcher=INTERPRET)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16
        assert torch.equal(out, dynamic), f"{variant} {fmt} SPLIT_K={split_k}: max diff {(out - dynamic).abs().max()}"
        ref = ops.linear_fp8(x_q, weight, weight_scale, x_scale, *rest, **pre)
        assert torch.equal(ref, ops.linear_fp8(x, weight, weight_scale, *rest, **attrs)), variant


@pytest.mark.parametrize("variant", ["block", "channel_group"])
def test_linear_fp8_quant_a_matches_separate_quant(variant):
    """QUANT_A (the block GEMM quantizes x's groups itself) computes the bits of the quant launch + GEMM
    (split-K with and without SELF_REDUCE included), and records no quant kernel."""
    M, N, K = 7, 384, 512
    for fmt, split_k, self_reduce in (("e4m3fn", 1, False), ("e4m3fnuz", 4, False), ("e4m3fn", 2, True)):
        x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, fmt)
        assert attrs["act_scheme"] == "dynamic_group"
        x[3] = 0  # a zero row: scale 1
        config = gemm_fp8._config(16, 64, 128, 1, split_k, 4, 2)
        fused = {**config, "constexprs": {**config["constexprs"], "QUANT_A": True, "SELF_REDUCE": self_reduce}}
        separate = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=INTERPRET)
        out = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=fused, launcher=INTERPRET)
        assert torch.equal(out, separate), f"{variant} {fmt} SPLIT_K={split_k}: max diff {(out - separate).abs().max()}"
        recorder = RecordingLauncher()
        meta = [t.to("meta") for t in (x, weight, weight_scale, *rest)]
        gemm_fp8.linear_fp8(*meta, **attrs, config=fused, launcher=recorder)
        assert not any("_quant_fp8_kernel" in c.kernel for c in recorder.calls), recorder.calls


def test_prequantized_wrapper_launches_no_quant_kernel():
    M, N, K = 7, 576, 4608
    for variant, group in (("token_channel", 0), ("block", 128)):
        x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, "e4m3fn",
                                                         device="meta")
        x_q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device="meta")
        x_scale = torch.empty(M, K // group if group else 1, device="meta")
        problem = {"M": M, "N": N, "K": K, "dtype": "bfloat16", "has_bias": True, "weight_scheme":
                   attrs["weight_scheme"], "act_scheme": "prequantized", "fp8_format": "e4m3fn",
                   "block_size": attrs["block_size"], "group": group}
        config = gemm_fp8.default_config(problem)
        recorder = RecordingLauncher()
        pre = dict(attrs, act_scheme="prequantized", group=group, out_dtype="bfloat16")
        out = gemm_fp8.linear_fp8(x_q, weight, weight_scale, x_scale, *rest, **pre, config=config, launcher=recorder)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16
        names = [call.kernel.rpartition(":")[2] for call in recorder.calls]
        assert "_quant_fp8_kernel" not in names and names[-1] == "_fp8_splitk_reduce_kernel", names


# ---------------------------------------------------------------- passes on small graphs

H, N = 256, 128


def _fp8_linear(name: str, x: str, scheme: str, weights: dict, specs: dict, seed: int) -> Node:
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_rows(torch.randn(N, H, generator=g) / 16, "e4m3fn")
    weights[f"{name}.w"], weights[f"{name}.s"] = q, s.reshape(N)
    specs[f"{name}.w"] = WeightSpec("float8_e4m3fn", (N, H), "fp8-channel")
    specs[f"{name}.s"] = WeightSpec("float32", (N,), "fp8-scale")
    ins = [x, f"{name}.w", f"{name}.s"]
    if scheme == "static":
        weights[f"{name}.in"] = torch.tensor([4.0 / 448])
        specs[f"{name}.in"] = WeightSpec("float32", (1,))
        ins.append(f"{name}.in")
    return Node(name, "linear_fp8", ins, [name], {"weight_scheme": "channel", "act_scheme": scheme,
                "fp8_format": "e4m3fn", "block_size": [128, 128] if scheme == "dynamic_group" else None,
                "has_bias": False})


def _graph(producer: str, schemes: list[str], extra_reader: bool = False):
    """x -> rms_norm (with a residual) or gated_act -> one linear_fp8 per scheme (+ an add reading it)."""
    g = torch.Generator().manual_seed(0)
    width = 2 * H if producer == "gated_act" else H
    inputs = {"x": TensorSpec("bfloat16", ("T", width)), "r": TensorSpec("bfloat16", ("T", H))}
    weights = {"norm.w": torch.randn(H, generator=g).to(torch.bfloat16)}
    specs = {"norm.w": WeightSpec("bfloat16", (H,))}
    if producer == "rms_norm":
        nodes = [Node("norm", "rms_norm", ["x", "r", "norm.w"], ["y", "h"], {"eps": 1e-6})]
    else:
        nodes = [Node("act", "gated_act", ["x"], ["y"], {"act": "silu"})]
    nodes += [_fp8_linear(f"lin{i}", "y", s, weights, specs, i) for i, s in enumerate(schemes)]
    outputs = [f"lin{i}" for i in range(len(schemes))] + (["h"] if producer == "rms_norm" else [])
    if extra_reader:
        nodes.append(Node("extra", "add", ["y", "r"], ["extra"]))
        outputs.append("extra")
    graph = Graph(inputs, specs, nodes, outputs)
    verify(graph)
    values = {"x": torch.randn(6, width, generator=g).to(torch.bfloat16) * 2,
              "r": torch.randn(6, H, generator=g).to(torch.bfloat16)}
    return graph, weights, values


def _run_pass(producer: str, schemes: list[str], extra_reader: bool = False):
    graph, weights, values = _graph(producer, schemes, extra_reader)
    before = interpreter.run(graph, weights, values)
    ctx = CompileState(graph, weights, "cpu")
    module = fuse_norm_quant if producer == "rms_norm" else fuse_act_quant
    module.run(ctx)
    verify(graph)
    after = interpreter.run(graph, weights, values)
    for name, value in before.items():  # fused or not, the reference computes the same bits
        assert torch.equal(after[name], value), f"{producer} {schemes}: {name} changed"
    return graph, ctx.decisions


@pytest.mark.parametrize("producer", ["rms_norm", "gated_act"])
@pytest.mark.parametrize("schemes,group", [(["dynamic_token"], 0), (["dynamic_group", "dynamic_group"], 128)])
def test_pass_fuses_dynamic_readers(producer, schemes, group):
    graph, decisions = _run_pass(producer, schemes)
    fused = graph.nodes[0]
    assert fused.op == f"{producer}_quant" and fused.attrs["group"] == group and fused.attrs["fp8_format"] == "e4m3fn"
    assert fused.outputs[:2] == ["y.fp8", "y.fp8_scale"]
    assert fused.outputs[2:] == (["h"] if producer == "rms_norm" else [])  # the residual sum keeps its name
    for lin in graph.nodes[1:]:
        assert lin.attrs["act_scheme"] == "prequantized" and lin.attrs["out_dtype"] == "bfloat16"
        assert lin.inputs[0] == "y.fp8" and lin.inputs[3] == "y.fp8_scale" and lin.attrs["group"] == group
    name = "fuse_norm_quant" if producer == "rms_norm" else "fuse_act_quant"
    assert [(d["pass"], d["node"]) for d in decisions] == [(name, fused.name)]
    assert decisions[0]["action"].startswith("fused") and all(n.name in decisions[0]["action"] for n in graph.nodes[1:])


@pytest.mark.parametrize("producer", ["rms_norm", "gated_act"])
@pytest.mark.parametrize("schemes,extra_reader,why", [
    (["static"], False, "static input scale"),
    (["none"], False, "a16w8"),
    (["dynamic_token", "dynamic_group"], False, "quantize differently"),
    (["dynamic_token"], True, "also read by extra (add)"),
])
def test_pass_keeps_and_says_why(producer, schemes, extra_reader, why):
    graph, decisions = _run_pass(producer, schemes, extra_reader)
    assert graph.nodes[0].op == producer
    assert all(n.attrs["act_scheme"] == s for n, s in zip(graph.nodes[1:], schemes))
    assert len(decisions) == 1 and decisions[0]["action"] == "kept unfused" and why in decisions[0]["reason"], decisions


def test_pass_is_silent_without_fp8_readers():
    graph, weights, _ = _graph("rms_norm", [])
    graph.outputs = ["y", "h"]
    ctx = CompileState(graph, weights, "cpu")
    fuse_norm_quant.run(ctx)
    assert ctx.graph.nodes[0].op == "rms_norm" and ctx.decisions == []


# ---------------------------------------------------------------- whole models

_PLANS: dict = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_fusions")
    for scheme in ("fp8-block", "fp8-tensor"):
        write_random_checkpoint(root / scheme, hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64,
                                intermediate=512, vocab=1000, scheme=scheme)
    return root


def _plan(checkpoints, scheme: str, target: str, disabled: tuple[str, ...] = ()):
    key = (scheme, target, disabled)
    if key not in _PLANS:
        out = checkpoints / f"{scheme}.{target}.{len(disabled)}.msgpack"
        _PLANS[key] = rdnac.compile(checkpoints / scheme, target, out, quiet=True, max_model_len=256,
                                    max_num_seqs=2, max_num_batched_tokens=16, disable_passes=disabled)
    return _PLANS[key]


@pytest.mark.parametrize("target,scheme", [("sm90", "fp8-block"), ("gfx1201", "fp8-tensor"), ("gfx942", "fp8-block"),
                                           ("gfx1151", "fp8-block"), ("cpu", "fp8-tensor")])
def test_fp8_plans_fuse_where_activations_are_quantized(checkpoints, target, scheme):
    plan = rdnac.load(_plan(checkpoints, scheme, target), interpret=target != "cpu")
    ops_ = plan.graph.op_counts()
    decisions = [d for d in plan.plan.body["decisions"] if d["pass"] in PASSES]
    linears = {n.name.rsplit(".", 1)[1]: n.attrs for n in plan.graph.nodes if n.op == "linear_fp8"}
    if target == "gfx1151":  # a16w8: nothing to fuse, and the log says why for each norm and activation
        assert "rms_norm_quant" not in ops_ and "gated_act_quant" not in ops_
        assert len(decisions) == 3 and all("a16w8" in d["reason"] for d in decisions)
        return
    # grouped on a GPU: fuse_act_linear then moves the activation into the down projection (tested below)
    act_linear = target != "cpu" and scheme == "fp8-block"
    assert ops_["rms_norm_quant"] == 2 and ops_["rms_norm"] == 1  # final norm
    counts = (ops_.get("gated_act_quant", 0), ops_.get("gated_act_linear_fp8", 0))
    assert counts == ((0, 1) if act_linear else (1, 0)), counts
    fmt = "e4m3fnuz" if target == "gfx942" else "e4m3fn"
    group = 128 if scheme == "fp8-block" else 0
    if act_linear:  # the down projection reads gate_up and quantizes act(gate) * up itself
        down = next(n for n in plan.graph.nodes if n.name.endswith("down_proj"))
        assert down.op == "gated_act_linear_fp8" and down.attrs["group"] == group and down.attrs["fp8_format"] == fmt
        assert down.inputs[0] == next(n for n in plan.graph.nodes if n.name.endswith("gate_up_proj")).outputs[0]
    for leaf in ("qkv_proj", "gate_up_proj") + (() if act_linear else ("down_proj",)):
        assert linears[leaf]["act_scheme"] == "prequantized" and linears[leaf]["group"] == group
        assert linears[leaf]["fp8_format"] == fmt
    assert linears["o_proj"]["act_scheme"].startswith("dynamic")  # attention output: quantized by the linear
    assert sorted(d["node"] for d in decisions) == ["layers.0.act", "layers.0.input_norm", "layers.0.post_norm"]
    assert all(d["action"].startswith(f"fused {fmt}") for d in decisions)
    if target != "cpu":
        kernels = {k["kernel"].rpartition(".")[2] for k in plan.plan.body["kernels"]}
        act_kernel = "activation_quant:_gated_act_quant_kernel"
        assert {"rms_norm_quant:_rms_norm_quant_kernel"} | (set() if act_linear else {act_kernel}) <= kernels
        if act_linear:  # every step holds <= 16 tokens, a decode size: the down GEMM runs the activation itself
            assert act_kernel not in kernels
            assert any(k["call"]["constexprs"].get("GATED_A") == "silu" for k in plan.plan.body["kernels"]
                       if k["kernel"].endswith(":_fp8_block_gemm_kernel"))


def test_disable_pass(checkpoints):
    plan = rdnac.load(_plan(checkpoints, "fp8-tensor", "cpu", ("fuse_act_quant",)))
    ops_ = plan.graph.op_counts()
    assert ops_["rms_norm_quant"] == 2 and "gated_act_quant" not in ops_ and ops_["gated_act"] == 1
    skipped = [d for d in plan.plan.body["decisions"] if d["pass"] == "fuse_act_quant"]
    assert [(d["action"], d["reason"]) for d in skipped] == [("skipped", "disabled with --disable-pass")]


def test_cpu_plan_fusion_on_vs_off_is_bit_identical(checkpoints):
    for scheme in ("fp8-block", "fp8-tensor"):
        on = rdnac.load(_plan(checkpoints, scheme, "cpu"))
        off = rdnac.load(_plan(checkpoints, scheme, "cpu", PASSES))
        assert "rms_norm_quant" in on.graph.op_counts() and "rms_norm_quant" not in off.graph.op_counts()
        assert torch.equal(on.logits(PROMPT), off.logits(PROMPT)), scheme


@pytest.mark.parametrize("target,scheme", [("sm90", "fp8-block"), ("gfx942", "fp8-tensor")])
def test_gpu_plan_fusion_on_vs_off_under_interpreter(checkpoints, target, scheme):
    """The plan's own kernels under the Triton interpreter; the fused kernels reproduce the unfused
    bytes, so the logits agree (bit for bit today; the bound allows another reduction order)."""
    on = rdnac.load(_plan(checkpoints, scheme, target), interpret=True)
    off = rdnac.load(_plan(checkpoints, scheme, target, PASSES), interpret=True)
    ours, theirs = on.logits(PROMPT).float(), off.logits(PROMPT).float()
    reference = LLM(ModelRunner(on.plan, on.weights, "cpu")).logits(PROMPT).float()
    assert ours.shape == theirs.shape == (len(PROMPT), 1000) and ours.dtype == torch.float32
    diff = (ours - theirs).abs().max().item()
    print(f"\n{target} {scheme}: fused vs unfused max abs logit diff {diff:.3g}; "
          f"fused vs reference interpreter {(ours - reference).abs().max():.3g}")
    assert diff <= 2e-2, f"fused vs unfused logits differ by {diff:.3g}"
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min().item()
    assert cosine >= 0.985, cosine


# ---------------------------------------------------------------- cross-compilation


@pytest.mark.slow
@pytest.mark.parametrize("target,fmt", [("gfx1201", "e4m3fn"), ("gfx942", "e4m3fnuz")])
def test_default_configs_compile_at_real_shapes(target, fmt):
    """Default configs at Llama/Qwen widths (one tile, and the looping path past 8192) fit the target
    and spill nothing; gfx1201's wave32 register file is the tightest of the FP8 targets."""
    from rdnac.compiler.build import check_resources, compile_calls

    recorder = RecordingLauncher()
    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    for M in (1, 2048):  # decode sizes take other tiles (CHUNK programs, fewer warps)
        for group in (0, 128):
            for H in (4096, 16384):
                cfg = rms_norm_quant.default_config({"H": H, "group": group, "M": M})
                rms_norm_quant.rms_norm_quant(meta(M, H), meta(M, H), meta(H), eps=1e-6, fp8_format=fmt, group=group,
                                              config=cfg, launcher=recorder)
            cfg = activation_quant.default_config({"I": 12288, "group": group, "M": M})
            activation_quant.gated_act_quant(meta(M, 2 * 12288), act="silu", fp8_format=fmt, group=group, config=cfg,
                                             launcher=recorder)
    assert len(recorder.calls) == 8  # distinct calls: per-token scales and 16384-wide rows ignore M
    for binary in compile_calls(recorder.calls, target, quiet=True):
        assert check_resources(binary, target) == [], binary.key


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_fused_kernels_gpu_match_unfused_kernels():
    """On the GPU with the families' default configs: the same scales and fp8 bytes as the unfused kernels,
    except that a norm whose sum of squares runs in another order may move one in 10^5 bytes by one code
    (measured on an H200: 1 of 1.5M at H=5120; the activation's bytes all agree)."""
    launcher = JitLauncher()
    fmt = "e4m3fnuz" if torch.version.hip and "gfx94" in torch.cuda.get_device_properties(0).gcnArchName \
        else "e4m3fn"
    g = torch.Generator().manual_seed(0)
    for H in (300, 4096, 5120, 12288):
        for M in (1, 33, 300):
            x = torch.randn(M, H, generator=g).to(torch.bfloat16).cuda()
            residual = torch.randn(M, H, generator=g).to(torch.bfloat16).cuda()
            weight = torch.randn(H, generator=g).to(torch.bfloat16).cuda()
            for group in (0, 128):
                cfg = rms_norm_quant.default_config({"H": H, "group": group, "M": M})
                q, scale, total = rms_norm_quant.rms_norm_quant(x, residual, weight, eps=1e-6, fp8_format=fmt,
                                                                group=group, config=cfg, launcher=launcher)
                y, total_ref = rms_norm.rms_norm(x, residual, weight, eps=1e-6, launcher=launcher,
                                                 config=rms_norm.default_config({"H": H, "num_heads": 1}))
                what = f"rms_norm_quant GPU H={H} M={M} group={group}"
                _assert_same_quant(what, q, scale, *fp8_quant.quantize_activations(y, None, fmt, group, launcher=launcher),
                                   max_flips=1e-5)
                assert torch.equal(total, total_ref), what
                gate_up = torch.randn(M, 2 * H, generator=g).to(torch.bfloat16).cuda()
                cfg = activation_quant.default_config({"I": H, "group": group, "M": M})
                q, scale = activation_quant.gated_act_quant(gate_up, act="silu", fp8_format=fmt, group=group,
                                                            config=cfg, launcher=launcher)
                y = activation.gated_act(gate_up, act="silu", config=activation.default_config({"I": H}),
                                         launcher=launcher)
                _assert_same_quant(f"gated_act_quant GPU I={H} M={M} group={group}", q, scale,
                                   *fp8_quant.quantize_activations(y, None, fmt, group, launcher=launcher))


def test_inspect_tools_read_fused_plans(checkpoints, tmp_path):
    """ONNX export passes onnx.checker, the HTML report marks the fused nodes, and `verify` of the
    fused cpu plan against its unfused reference passes (values compared by name)."""
    import onnx

    from rdnac.cli.onnx_export import export_onnx
    from rdnac.cli.report import report_data
    from rdnac.cli.verify import verify_plan

    sm90 = _plan(checkpoints, "fp8-block", "sm90", ("fuse_act_linear",))  # the activation stays a node
    model = onnx.load(str(export_onnx(sm90, tmp_path / "p.onnx")))
    assert {"rms_norm_quant", "gated_act_quant"} <= {n.op_type for n in model.graph.node}
    nodes = {n["name"]: n for layer in report_data(sm90)["layers"] for n in layer["nodes"]}
    assert any(f.startswith("fuse_norm_quant") for f in nodes["layers.0.input_norm"]["fusion"])
    assert any(f.startswith("fuse_act_quant") for f in nodes["layers.0.act"]["fusion"])
    fused = _plan(checkpoints, "fp8-block", "sm90")  # fuse_act_linear: the down projection took it in
    op_types = {n.op_type for n in onnx.load(str(export_onnx(fused, tmp_path / "f.onnx"))).graph.node}
    assert {"rms_norm_quant", "gated_act_linear_fp8"} <= op_types and "gated_act_quant" not in op_types
    nodes = {n["name"]: n for layer in report_data(fused)["layers"] for n in layer["nodes"]}
    assert any(f.startswith("fuse_act_linear") for f in nodes["layers.0.down_proj"]["fusion"])
    result = verify_plan(_plan(checkpoints, "fp8-tensor", "cpu"), checkpoints / "fp8-tensor", token_ids=PROMPT)
    assert result.is_ok and any(r.value == "logits" and r.error == 0.0 for r in result.rows)
