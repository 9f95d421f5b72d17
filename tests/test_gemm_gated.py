"""Gated GEMM (`linear_gated_act`): the MLP's merged gate/up GEMM with its activation in one kernel.

Kernels run under the Triton interpreter. The fused kernel must write the unfused pair's bytes
(`_gemm_kernel` with the same tile, then `_gated_act_kernel`) and be close to the IR reference; so
must a WIDE config (`_gemm_kernel` with its gated epilogue, gate and up columns interleaved). The
pass `fuse_gated_linear` is checked on hand-built graphs (what fuses, what is kept and why) and on
tiny Llama and Qwen3 checkpoints against transformers (cpu plans), fusion on vs off bit for bit, and
compiled for sm90 with the fused kernels within the target's resources.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.compiler import cost_model, tuning
from rdnac.compiler.passes import CompileState, fuse_gated_linear
from rdnac.compiler.record import RecordingLauncher
from rdnac.ir import interpreter, ops
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec
from rdnac.ir.verify import verify
from rdnac.kernels import activation, gemm, gemm_gated
from rdnac.kernels.launch import InterpretLauncher
from rdnac.targets import get_target
from tests.support.aot import aot_launcher
from tests.support.checkpoints import make_checkpoint, reference_greedy, reference_logits

INTERPRET = InterpretLauncher()
ACTS = ["silu", "gelu", "gelu_tanh"]
PASS = "fuse_gated_linear"
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
# (atol, rtol) vs the IR reference in fp32 from the same inputs: bf16 rounds gate, up, act(gate) and the
# product (2**-9 each), and the activation's slope can double the gate's share
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 4e-2)}


def _cfg(block_m, block_n, block_k, group_size_m, num_warps=4, num_stages=2) -> dict:
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_SIZE_M": group_size_m},
            "num_warps": num_warps, "num_stages": num_stages}


# decode tiles (16 rows), and prefill-shaped grouped tiles small enough for the interpreter
CONFIGS = [_cfg(16, 32, 64, 1), _cfg(16, 16, 128, 1), _cfg(64, 32, 32, 8, 8), _cfg(128, 64, 32, 8, 8)]


def _operands(M, I, K, dtype, has_bias, device="cpu", seed=0):
    """x [M, K], w [2I, K] (gate rows, then up rows) and bias [2I]; kernels only read them. On "meta" (a
    recording) shapes only; real ones are generated once per shape: the GPU sweeps check a dozen configs
    per shape, and drawing Qwen3-8B's 100M-element MLP weight on the CPU per case outlasted a device call."""
    if device == "meta":
        return (torch.empty(M, K, dtype=dtype, device="meta"), torch.empty(2 * I, K, dtype=dtype, device="meta"),
                torch.empty(2 * I, dtype=dtype, device="meta") if has_bias else None)
    return _random_operands(M, I, K, dtype, has_bias, device, seed)


@functools.lru_cache(maxsize=2)
def _random_operands(M, I, K, dtype, has_bias, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)  # [M, K]
    w = torch.randn(2 * I, K, generator=g) / math.sqrt(K)  # [2I, K]: gate rows, then up rows
    bias = torch.randn(2 * I, generator=g) if has_bias else None  # [2I]
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(bias)


def _unfused(x, w, bias, act, config, launcher):
    """The pair the fusion replaces: _gemm_kernel with the same tile (no split-K), then _gated_act_kernel."""
    gemm_config = {**config, "constexprs": {**config["constexprs"], "SPLIT_K": 1}}
    gate_up = gemm.linear(x, w, bias, config=gemm_config, launcher=launcher)  # [M, 2I]
    width = w.shape[0] // 2
    return activation.gated_act(gate_up, act=act, config=activation.default_config({"I": width}), launcher=launcher)


def _check(M, I, K, dtype, has_bias, act, config, launcher, device="cpu", exact=True):
    x, w, bias = _operands(M, I, K, dtype, has_bias, device)
    out = gemm_gated.linear_gated_act(x, w, bias, act=act, config=config, launcher=launcher)
    what = f"linear_gated_act M={M} I={I} K={K} {dtype} bias={has_bias} {act} {config}"
    assert out.shape == (M, I), f"{what}: shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    pair = _unfused(x, w, bias, act, config, launcher)
    if exact:
        assert torch.equal(out, pair), f"{what}: differs from the unfused kernels by up to {(out - pair).abs().max():.3g}"
    else:  # a rounding or two of the output dtype at the output's scale (see the kernel test)
        eps, scale = torch.finfo(dtype).eps, pair.float().abs().max().item()
        assert torch.allclose(out.float(), pair.float(), rtol=2 * eps, atol=2 * eps * scale), \
            f"{what}: differs from the unfused kernels by up to {(out.float() - pair.float()).abs().max():.3g}"
    ref = ops.linear_gated_act(x.float(), w.float(), None if bias is None else bias.float(), act=act)
    atol, rtol = TOLERANCES[dtype]
    err = (out.float() - ref.float()).abs().max().item()
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(str(v) for v in c["constexprs"].values()))
def test_fused_kernel_is_the_unfused_pair_bit_for_bit(dtype, act, config):
    # M not a multiple of BLOCK_M, K not a multiple of BLOCK_K. Bit for bit where I is a multiple of
    # BLOCK_N: the unfused GEMM's up tiles then hold exactly the fused kernel's up columns. Where it is
    # not, a merged tile mixes gate and up columns, and the interpreter's tl.dot (numpy's BLAS) rounds
    # a column differently by its place in the tile; there the fused output is held to two roundings of
    # the pair here, and to its bits on the GPU (test_fused_kernel_gpu_is_the_unfused_pair_bit_for_bit).
    for M, I, K, has_bias in ((5, 128, 72, False), (70, 128, 100, True)):
        _check(M, I, K, dtype, has_bias, act, config, INTERPRET)
    for M, I, K, has_bias in ((5, 100, 72, False), (70, 72, 100, True)):
        _check(M, I, K, dtype, has_bias, act, config, INTERPRET, exact=False)


def test_empty_batch_and_bad_weight():
    x, w, _ = _operands(0, 40, 32, torch.float32, False)
    assert gemm_gated.linear_gated_act(x, w, act="silu", config=CONFIGS[0], launcher=INTERPRET).shape == (0, 40)
    with pytest.raises(AssertionError, match=r"\[2I, K\]"):
        gemm_gated.linear_gated_act(x, w[:-1], act="silu", config=CONFIGS[0], launcher=INTERPRET)


def _wide(block_m, block_n, block_k, group_size_m, split_k=1, num_warps=4, num_stages=2, self_reduce=False) -> dict:
    """A WIDE config: the merged [2I, K] GEMM's tile (BLOCK_N / 2 gate/up pairs), gated in its epilogue."""
    merged = gemm._config(block_m, block_n, block_k, group_size_m, split_k, num_warps, num_stages)
    if self_reduce:
        merged["constexprs"]["SELF_REDUCE"] = True
    (config,) = gemm_gated.wide_configs([merged])
    return config


# decode tiles (one split-K self-reducing), a middle one, and a prefill-shaped grouped one small enough to interpret
WIDE_CONFIGS = [_wide(16, 64, 64, 1), _wide(16, 32, 64, 1, split_k=2, self_reduce=True),
                _wide(32, 64, 32, 1, num_warps=8), _wide(128, 128, 32, 8, num_warps=8)]


def _gemm_config(config: dict) -> dict:
    return {**config, "constexprs": {k: v for k, v in config["constexprs"].items() if k != "WIDE"}}


def _wide_and_pair(x, w, bias, act, config, launcher):
    """The WIDE kernel's output and the unfused pair's (the same GEMM tile, then the activation kernel)."""
    out = gemm_gated.linear_gated_act(x, w, bias, act=act, config=config, launcher=launcher)
    gate_up = gemm.linear(x, w, bias, config=_gemm_config(config), launcher=launcher)  # [M, 2I]
    act_config = activation.default_config({"I": w.shape[0] // 2})
    return out, activation.gated_act(gate_up, act=act, config=act_config, launcher=launcher)  # [M, I] each


def _check_wide(M, I, K, dtype, has_bias, act, config, launcher, device="cpu", exact=False):
    """WIDE against the unfused pair with the same GEMM config (bit for bit where `exact`, else within two
    roundings: see below) and against the IR reference."""
    x, w, bias = _operands(M, I, K, dtype, has_bias, device)
    out, pair = _wide_and_pair(x, w, bias, act, config, launcher)
    what = f"WIDE linear_gated_act M={M} I={I} K={K} {dtype} bias={has_bias} {act} {config}"
    assert out.shape == (M, I), f"{what}: shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    err = (out.float() - pair.float()).abs().max().item()
    if exact:
        assert torch.equal(out, pair), f"{what}: differs from the unfused pair by up to {err:.3g}"
    else:  # bf16: two roundings of the output; fp32 output also shows the K sum's order (measured: < 3 eps)
        eps, scale = torch.finfo(dtype).eps, pair.float().abs().max().item()
        roundings = 2 if dtype == torch.bfloat16 else 8
        assert torch.allclose(out.float(), pair.float(), rtol=2 * eps, atol=roundings * eps * scale), \
            f"{what}: differs from the unfused pair by up to {err:.3g}"
    ref = ops.linear_gated_act(x.float(), w.float(), None if bias is None else bias.float(), act=act)
    atol, rtol = TOLERANCES[dtype]
    err = (out.float() - ref.float()).abs().max().item()
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"
    return x, w, bias, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("config", WIDE_CONFIGS, ids=lambda c: "x".join(str(v) for v in c["constexprs"].values()))
def test_wide_kernel_is_the_unfused_pair(dtype, act, config):
    """M = 1 and M > 1 (not a multiple of BLOCK_M), K not a multiple of BLOCK_K, I a multiple of BLOCK_N / 2 and
    not (masked pairs), with and without bias. Against the unfused pair on the merged weight: within two
    roundings, because the WIDE tile interleaves gate and up columns and the interpreter's tl.dot (numpy's
    BLAS) may round a column by its place in the tile (bit for bit on the GPU:
    test_wide_kernel_gpu_is_the_unfused_pair_bit_for_bit). Bit for bit here against the same pair on that
    weight with its rows interleaved as the tile reads them (gate row j at 2j, up row j at 2j + 1): the
    GEMM then sees every column at its WIDE place, so this holds the row mapping, the bias, the masks and
    the epilogue's arithmetic exactly."""
    for M, I, K, has_bias in ((1, 128, 200, True), (5, 96, 72, False), (70, 100, 200, True)):
        x, w, bias, out = _check_wide(M, I, K, dtype, has_bias, act, config, INTERPRET)
        order = torch.stack([torch.arange(I), I + torch.arange(I)], dim=1).flatten()  # [2I]: g0, u0, g1, u1, ...
        gate_up = gemm.linear(x, w[order], None if bias is None else bias[order], config=_gemm_config(config),
                              launcher=INTERPRET)  # [M, 2I], interleaved
        pair = activation.gated_act(gate_up[:, 0::2].contiguous(), gate_up[:, 1::2].contiguous(), act=act,
                                    config=activation.default_config({"I": I}), launcher=INTERPRET)
        assert torch.equal(out, pair), \
            f"M={M} I={I}: differs from the interleaved pair by up to {(out.float() - pair.float()).abs().max():.3g}"


def test_wide_configs_keep_split_k_only_with_self_reduce():
    configs = gemm.config_space({"M": 1, "N": 2 * 12288, "K": 4096, "dtype": "bfloat16", "has_bias": False})
    with_self_reduce = [{**c, "constexprs": {**c["constexprs"], "SELF_REDUCE": True}} for c in configs
                        if c["constexprs"]["SPLIT_K"] > 1]
    assert with_self_reduce, "the decode space of an 8B MLP has split-K configs"
    wide = gemm_gated.wide_configs(configs + with_self_reduce)
    assert all(c["constexprs"]["WIDE"] for c in wide)
    assert [_gemm_config(c) for c in wide] == [c for c in configs if c["constexprs"]["SPLIT_K"] == 1] + with_self_reduce


def test_wide_rejects_split_k_without_self_reduce():
    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    config = {**_wide(16, 64, 64, 1), "constexprs": {**_wide(16, 64, 64, 1)["constexprs"], "SPLIT_K": 2}}
    with pytest.raises(AssertionError, match=r"requires SPLIT_K 1 or SELF_REDUCE.*got SPLIT_K=2 without SELF_REDUCE"):
        gemm_gated.linear_gated_act(meta(1, 4096), meta(2 * 12288, 4096), act="silu", config=config,
                                    launcher=RecordingLauncher())


def test_wide_prefill_tile_compiles_for_sm90_without_spills():
    """The [128, 256] x 64 tile (8 warps, 3 stages) that wins the merged GEMM at prefill on an H200, gated, at
    Qwen3-8B's MLP: one kernel on wgmma, no spills, shared memory within sm90; with its bias, and a
    self-reducing decode config with PDL and weight prefetch. gfx1201 builds the configs that fit it."""
    from rdnac.compiler.build import check_resources, compile_calls

    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    I, K = 12288, 4096
    prefill = _wide(128, 256, 64, 8, num_warps=8, num_stages=3)
    decode = _wide(16, 64, 128, 1, split_k=4, num_stages=3, self_reduce=True)
    decode["constexprs"]["PREFETCH"] = 4
    for target, configs in (("sm90", (prefill, decode)), ("gfx1201", (_wide(128, 128, 32, 8, num_warps=8), decode))):
        rec = RecordingLauncher(pdl=target == "sm90")
        for config in configs:
            M = 2048 if config["constexprs"]["BLOCK_M"] == 128 else 1
            for bias in (None, meta(2 * I)):
                gemm_gated.linear_gated_act(meta(M, K), meta(2 * I, K), bias, act="silu", config=config, launcher=rec)
        assert [(c.kernel.split(":")[1], c.constexprs["GATED"]) for c in rec.calls] == [("_gemm_kernel", "silu")] * 4
        for binary in compile_calls(rec.calls, target, quiet=True):
            assert check_resources(binary, target) == [], (target, binary.key)
            res = binary.resources
            assert res.num_spills == 0 and res.matrix_instructions, (target, binary.key, res)
            if target == "sm90" and binary.call.constexprs["BLOCK_N"] == 256:
                assert any(i.startswith("wgmma.") for i in res.matrix_instructions), res


def test_cost_model_ranks_wide_as_the_merged_tile():
    """WIDE is measured only (not in config_space), but tune ranks the measured configs with the model: a WIDE
    tile is the merged GEMM's tile as it stands, writing [M, I] instead of [M, 2I]."""
    target = get_target("sm90")
    problem = {"M": 2048, "N": 12288, "K": 4096, "dtype": "bfloat16", "act": "silu"}
    merged = gemm_gated.merged_problem(problem)
    wide = _wide(128, 256, 64, 8, num_warps=8, num_stages=3)
    est = cost_model.estimate("gemm_gated", problem, wide, target)
    plain = cost_model.estimate("gemm", merged, _gemm_config(wide), target)
    assert est.is_feasible and est.tiles == plain.tiles == 16 * 96 and est.flops == plain.flops
    assert plain.bytes_moved - est.bytes_moved == 2048 * 12288 * 2  # half the merged [M, 2I] bf16 output
    mixed = [wide, _cfg(128, 128, 64, 8, 8, 3)] + gemm_gated.unfused_configs([_gemm_config(wide)], problem)
    assert len(cost_model.rank("gemm_gated", problem, mixed, target)) == 3


@pytest.mark.parametrize("M", [1, 16, 64, 256, 2048])
def test_config_space_is_gemms_without_split_k_at_half_width(M):
    problem = {"M": gemm.m_bucket(M), "N": 12288, "K": 4096, "dtype": "bfloat16", "act": "silu"}
    space = gemm_gated.config_space(problem)
    assert space and gemm_gated.default_config(problem) in space
    merged = gemm.config_space({**problem, "N": 2 * 12288, "has_bias": False})
    widths = {(c["constexprs"]["BLOCK_M"], 2 * c["constexprs"]["BLOCK_N"], c["constexprs"]["BLOCK_K"]) for c in space}
    assert widths <= {(c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["constexprs"]["BLOCK_K"])
                      for c in merged}
    assert all("SPLIT_K" not in c["constexprs"] and c["constexprs"]["BLOCK_N"] >= 16 for c in space)
    block_m = {c["constexprs"]["BLOCK_M"] for c in space}
    assert block_m == ({16} if M <= 16 else {M} if M <= 64 else {64} if M <= 256 else {128})
    # ranked like the merged GEMM: the cost model sees a tile 2 x BLOCK_N wide
    target = get_target("sm90")
    ranked = cost_model.rank("gemm_gated", problem, space, target)
    assert all(est.is_feasible for _, est in ranked), [est.reason for _, est in ranked]


def test_real_shapes_compile_within_resources():
    """Default configs at Qwen3-8B's MLP (I=12288, K=4096) build for sm90 and gfx1201 and fit: no spills,
    LDS within the target."""
    from rdnac.compiler.build import check_resources, compile_calls

    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    rec = RecordingLauncher()
    for M in (1, 64, 2048):
        config = gemm_gated.default_config({"M": gemm.m_bucket(M), "N": 12288, "K": 4096, "dtype": "bfloat16",
                                            "act": "silu"})
        gemm_gated.linear_gated_act(meta(M, 4096), meta(2 * 12288, 4096), act="silu", config=config, launcher=rec)
    assert [c.kernel.split(":")[1] for c in rec.calls] == ["_gemm_gated_kernel"] * 3
    for target in ("sm90", "gfx1201"):
        for binary in compile_calls(rec.calls, target, quiet=True):
            assert check_resources(binary, target) == [], (target, binary.key)


# ---------------------------------------------------------------- pass


def _graph(*, merged=True, bias=False, extra_reader=False, fp8=False) -> tuple[Graph, dict]:
    """x -> linear(W [2I, H]) -> gated_act -> out (and optionally another reader of gate_up)."""
    H, I = 24, 40
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(2 * I, H, generator=g) / math.sqrt(H), "b": torch.randn(2 * I, generator=g)}
    specs = {"w": WeightSpec("float32", (2 * I, H)), "b": WeightSpec("float32", (2 * I,))}
    lin_ins = ["x", "w"] + (["b"] if bias else [])
    if merged:
        nodes = [Node("gate_up", "linear", lin_ins, ["gu"], {}),
                 Node("act", "gated_act", ["gu"], ["m"], {"act": "gelu_tanh"})]
    else:
        weights.update(wu=weights["w"][I:].clone())
        weights["w"] = weights["w"][:I].clone()
        specs.update(w=WeightSpec("float32", (I, H)), wu=WeightSpec("float32", (I, H)))
        nodes = [Node("gate", "linear", ["x", "w"], ["g"], {}), Node("up", "linear", ["x", "wu"], ["u"], {}),
                 Node("act", "gated_act", ["g", "u"], ["m"], {"act": "gelu_tanh"})]
    outputs = ["m"]
    if extra_reader:
        nodes.append(Node("gu2", "add", ["gu", "gu"], ["gu2"], {}))
        outputs.append("gu2")
    if fp8:
        nodes[0] = Node("gate_up", "linear_fp8", ["x", "w", "s"], ["gu"],
                        {"weight_scheme": "tensor", "act_scheme": "none", "fp8_format": "e4m3fn"})
        weights["w"] = weights["w"].to(torch.float8_e4m3fn)
        weights["s"] = torch.ones(1)
        specs.update(w=WeightSpec("float8_e4m3fn", (2 * I, H)), s=WeightSpec("float32", (1,)))
    graph = Graph(inputs={"x": TensorSpec("float32", ("T", H))}, weights=specs, nodes=nodes, outputs=outputs)
    verify(graph)
    return graph, weights


@pytest.mark.parametrize("bias", [False, True])
def test_pass_fuses_and_matches_the_reference(bias):
    graph, weights = _graph(bias=bias)
    x = {"x": torch.randn(7, 24, generator=torch.Generator().manual_seed(1))}
    before = interpreter.run(graph, weights, x)["m"]
    ctx = CompileState(graph, weights, "cpu")
    fuse_gated_linear.run(ctx)
    fused = ctx.graph
    verify(fused)
    assert [(n.name, n.op, n.inputs, n.outputs) for n in fused.nodes] == \
        [("gate_up", "linear_gated_act", ["x", "w", "b"] if bias else ["x", "w"], ["m"])]
    assert fused.nodes[0].attrs == {"act": "gelu_tanh"}
    assert [(d["pass"], d["node"]) for d in ctx.decisions] == [(PASS, "gate_up")]
    assert ctx.decisions[0]["action"].startswith("fused gated_act act (gelu_tanh) into the GEMM [80, 24]")
    after = interpreter.run(fused, weights, x)["m"]
    assert after.shape == before.shape == (7, 40) and torch.equal(after, before)


@pytest.mark.parametrize("variant,why", [("extra_reader", "gu is also read by gu2 (add)"),
                                         ("fp8", "gu comes from gate_up (linear_fp8), not a plain linear"),
                                         ("unmerged", "merge_linears did not merge them")])
def test_pass_keeps_and_says_why(variant, why):
    graph, weights = _graph(merged=variant != "unmerged", extra_reader=variant == "extra_reader", fp8=variant == "fp8")
    ops_before = [n.op for n in graph.nodes]
    ctx = CompileState(graph, weights, "cpu")
    fuse_gated_linear.run(ctx)
    assert [n.op for n in ctx.graph.nodes] == ops_before
    assert len(ctx.decisions) == 1 and ctx.decisions[0]["action"] == "kept unfused"
    assert why in ctx.decisions[0]["reason"], ctx.decisions[0]["reason"]


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_plans(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"gated_{family}")
    model = make_checkpoint(family, root / "ckpt")
    on = rdnac.compile(root / "ckpt", output=root / "on.msgpack")
    off = rdnac.compile(root / "ckpt", output=root / "off.msgpack", disable_passes=(PASS,))
    return family, root, model, on, off


def test_cpu_plans_match_transformers_and_the_unfused_plan(family_plans):
    family, _, model, on_path, off_path = family_plans
    on, off = rdnac.load(on_path), rdnac.load(off_path)
    layers = model.config.num_hidden_layers
    assert on.graph.op_counts()["linear_gated_act"] == layers and "gated_act" not in on.graph.op_counts()
    assert off.graph.op_counts()["gated_act"] == layers and "linear_gated_act" not in off.graph.op_counts()
    ours = on.logits(PROMPT)
    ref = reference_logits(model, PROMPT)
    assert ours.shape == ref.shape == (len(PROMPT), model.config.vocab_size) and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"{family}: max abs logit error {err:.3g}"
    assert torch.equal(ours, off.logits(PROMPT)), family
    assert on.generate([PROMPT], SamplingParams(max_tokens=12))[0].token_ids == reference_greedy(model, PROMPT, 12)
    skipped = [d for d in off.plan.body["decisions"] if d["pass"] == PASS]
    assert [(d["action"], d["reason"]) for d in skipped] == [("skipped", "disabled with --disable-pass")]


def test_sm90_plan_fuses_within_resources_and_runs_under_the_interpreter(family_plans, tmp_path):
    from rdnac.cli.report import report_data
    from rdnac.compiler.tune import problems_from_plan

    family, root, model, on_path, _ = family_plans
    path = rdnac.compile(root / "ckpt", "sm90", tmp_path / "sm90.msgpack", quiet=True, max_model_len=256,
                         max_num_seqs=2, max_num_batched_tokens=32)
    plan = rdnac.load(path, interpret=True)
    assert "gated_act" not in plan.graph.op_counts()
    kernels = {k["kernel"].rpartition(".")[2] for k in plan.plan.body["kernels"]}
    assert "gemm_gated:_gemm_gated_kernel" in kernels
    # unmeasured, decode steps take the fused kernel and steps above 16 tokens the unfused pair
    program = plan.plan.body["program"]["layers.0.gate_up_proj"]
    unfused = {key for key, choice in program.items() if choice["config"]["constexprs"].get("UNFUSED")}
    assert unfused == {key for key in program if int(key.split(":")[1]) > gemm.DECODE_MAX_M} != set(), program.keys()
    assert all("no measurement at this size" in program[key]["reason"] for key in unfused)
    rejected = [d for d in plan.plan.body["decisions"] if d["pass"] == "select_kernels" and "gate_up" in d["node"]
                and d["action"].startswith("rejected")]
    assert rejected == [], rejected  # the cost model's first pick fits sm90
    # the plan's own kernels (under the interpreter) against the cpu plan
    ours, ref = plan.logits(PROMPT).float(), rdnac.load(on_path).logits(PROMPT)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    assert cosine >= 0.995, f"{family}: sm90 plan (bf16, interpreted) vs cpu plan cosine {cosine:.4f}"
    # `rdnac inspect` shows the fused node
    nodes = {n["name"]: n for layer in report_data(path)["layers"] for n in layer["nodes"]}
    assert nodes["layers.0.gate_up_proj"]["op"] == "linear_gated_act"
    assert any(f.startswith(PASS) for f in nodes["layers.0.gate_up_proj"]["fusion"])
    # `rdnac tune` picks the gated GEMM up, keyed by N = I, K, dtype and act
    gated = [p for f, p in problems_from_plan(path) if f == "gemm_gated"]
    assert {p["M"] for p in gated} == {1, 2, 32}
    assert all(p["N"] == model.config.intermediate_size and p["act"] == "silu" for p in gated)


def test_tune_builds_gated_candidates_on_cpu():
    from rdnac.compiler.tune import build_candidates, candidates

    job = ("gemm_gated", {"M": 1, "N": 64, "K": 64, "dtype": "bfloat16", "act": "silu"})
    assert tuning.problem_key(*job) == "gemm_gated|N=64|K=64|dtype=bfloat16|act=silu"
    offered = candidates(*job)
    fused = [c for c in offered if not c["constexprs"].get("UNFUSED") and not c["constexprs"].get("WIDE")]
    unfused = [c for c in offered if c["constexprs"].get("UNFUSED")]
    wide = [c for c in offered if c["constexprs"].get("WIDE")]
    assert fused and all("SPLIT_K" not in c["constexprs"] for c in fused)
    # the unfused pair and WIDE are measured alike: the merged GEMM's candidates, the pair's each with the
    # activation's default
    merged = candidates("gemm", {"M": 1, "N": 128, "K": 64, "dtype": "bfloat16", "has_bias": False})
    assert len(unfused) == len(merged)
    assert all(c["act_config"] == activation.default_config({"I": 64}) for c in unfused)
    assert wide == gemm_gated.wide_configs(merged) != []
    assert not any(c["constexprs"].get("UNFUSED") or c["constexprs"].get("WIDE")
                   for c in gemm_gated.config_space(job[1]))  # measured only
    built = build_candidates([job], "sm90", log=lambda line: None)
    assert 0 < len(built) <= len(offered) and any(c["constexprs"].get("UNFUSED") for _, c, _ in built)
    assert any(c["constexprs"].get("WIDE") for _, c, _ in built)
    # at 8B decode the merged GEMM splits K: WIDE keeps only the self-reducing splits
    decode = {"M": 1, "N": 12288, "K": 4096, "dtype": "bfloat16", "act": "silu"}
    wide = [c["constexprs"] for c in candidates("gemm_gated", decode) if c["constexprs"].get("WIDE")]
    assert any(c["SPLIT_K"] > 1 for c in wide) and all(c["SPLIT_K"] == 1 or c.get("SELF_REDUCE") for c in wide)
    # and at prefill the [128, 256] x 64 tile is among them
    prefill = dict(decode, M=2048)
    assert any((c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["constexprs"]["BLOCK_K"]) == (128, 256, 64)
               for c in candidates("gemm_gated", prefill) if c["constexprs"].get("WIDE"))


def test_unfused_config_runs_the_pair_and_a_measured_one_is_selected(tmp_path, monkeypatch):
    """An UNFUSED config launches the merged GEMM and the activation (the same bits as the fused kernel
    where tiles align); a table entry that measured it fastest puts it in the plan for its regime only."""
    from rdnac.compiler.passes.select_kernels import _candidates

    config = _cfg(16, 32, 64, 1)
    (pair_config,) = gemm_gated.unfused_configs([{**config, "constexprs": {**config["constexprs"], "SPLIT_K": 1}}],
                                                {"N": 128})
    rec = RecordingLauncher()
    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    gemm_gated.linear_gated_act(meta(3, 64), meta(256, 64), act="silu", config=pair_config, launcher=rec)
    assert [c.kernel.split(":")[1] for c in rec.calls] == ["_gemm_kernel", "_gated_act_kernel"]
    x, w, bias = _operands(5, 128, 72, torch.bfloat16, True)
    pair = gemm_gated.linear_gated_act(x, w, bias, act="silu", config=pair_config, launcher=INTERPRET)
    assert torch.equal(pair, _unfused(x, w, bias, "silu", config, INTERPRET))
    assert torch.equal(pair, gemm_gated.linear_gated_act(x, w, bias, act="silu", config=config, launcher=INTERPRET))

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuning.load.cache_clear()
    try:
        problem = {"M": 2048, "N": 128, "K": 64, "dtype": "bfloat16", "act": "silu"}
        tuning.save(tmp_path / "rdnac" / "tuned" / "sm90.json", "Test GPU", {},
                    [{"key": tuning.problem_key("gemm_gated", problem), "M": 2048, "family": "gemm_gated",
                      "problem": problem, "config": pair_config, "us": 3.0, "candidates": 40}])
        target = get_target("sm90")
        picked, reason = _candidates("gemm_gated", dict(problem, M=gemm.m_bucket(512)), target)[0]
        assert picked == pair_config and "measured fastest of 40 candidates" in reason
        assert not _candidates("gemm_gated", dict(problem, M=1), target)[0][0]["constexprs"].get("UNFUSED")
    finally:
        tuning.load.cache_clear()


def test_a_measured_wide_config_is_selected_and_carried_to_other_shapes(tmp_path, monkeypatch):
    """select_kernels never offers WIDE unmeasured (gfx1201 ships no table); a table entry that measured it
    fastest at prefill puts it first there, and at another shape's prefill (nearest measured shape), never
    at decode."""
    from rdnac.compiler.passes.select_kernels import _candidates

    wide = _wide(128, 256, 64, 8, num_warps=8, num_stages=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuning.load.cache_clear()
    try:
        problem = {"M": 2048, "N": 12288, "K": 4096, "dtype": "bfloat16", "act": "silu"}
        target = get_target("gfx1201")
        assert not any(cfg["constexprs"].get("WIDE") for cfg, _ in _candidates("gemm_gated", problem, target))
        tuning.save(tmp_path / "rdnac" / "tuned" / "gfx1201.json", "Test GPU", {},
                    [{"key": tuning.problem_key("gemm_gated", problem), "M": 2048, "family": "gemm_gated",
                      "problem": problem, "config": wide, "us": 300.0, "candidates": 90}])
        picked, reason = _candidates("gemm_gated", problem, target)[0]
        assert picked == wide and "measured fastest of 90 candidates" in reason
        other = dict(problem, N=11008)  # not in the shipped table
        picked, reason = _candidates("gemm_gated", other, target)[0]
        assert picked == wide and "nearest measured shape N=12288" in reason
        assert not _candidates("gemm_gated", dict(problem, M=1), target)[0][0]["constexprs"].get("WIDE")
    finally:
        tuning.load.cache_clear()


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_fused_kernel_gpu_is_the_unfused_pair_bit_for_bit(tmp_path):
    """Every config of the space at decode, middle and prefill sizes, Qwen3-8B's MLP and an irregular one:
    the unfused pair's bytes (same tile, same K order, same epilogue arithmetic). Built ahead of time by
    parallel workers (`tests.support.aot`), for what `_check` launches: the fused kernel and the pair."""
    cases = [(M, I, K, torch.bfloat16, M == 33, act, config)
             for I, K in ((12288, 4096), (1823, 781)) for M in (1, 33, 300)
             for config in gemm_gated.config_space({"M": gemm.m_bucket(M), "N": I, "K": K, "dtype": "bfloat16",
                                                    "act": "silu"})
             for act in ACTS]
    recorder = RecordingLauncher()
    for M, I, K, dtype, has_bias, act, config in cases:
        x, w, bias = _operands(M, I, K, dtype, has_bias, "meta")
        gemm_gated.linear_gated_act(x, w, bias, act=act, config=config, launcher=recorder)
        _unfused(x, w, bias, act, config, recorder)
    launcher = aot_launcher(recorder.calls, tmp_path)
    for case in cases:
        _check(*case, launcher, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_wide_kernel_gpu_is_the_unfused_pair_bit_for_bit(tmp_path):
    """WIDE writes the unfused pair's bytes with the same GEMM config (each output element's K loop and
    epilogue arithmetic are the pair's): the prefill [128, 256] x 64 tile and the self-reducing split-K decode
    config for every activation, then every WIDE candidate `rdnac tune` measures (silu), at Qwen3-8B's MLP
    and an irregular shape. The kernels are built as plans build them (recorded over meta tensors, compiled
    ahead of time by parallel workers), not one JIT compile after another, which outlasted a device call."""
    from rdnac.compiler.tune import candidates

    cases = []  # (M, I, K, has_bias, act, config)
    chosen = {2048: [_wide(128, 256, 64, 8, num_warps=8, num_stages=3),
                     _wide(128, 128, 64, 8, num_warps=8, num_stages=3)],
              1: [_wide(16, 64, 128, 1, split_k=4, num_stages=3, self_reduce=True), _wide(16, 32, 256, 1)]}
    for I, K in ((12288, 4096), (1823, 781)):
        for M, configs in chosen.items():
            cases += [(M, I, K, M == 1, act, config) for config in configs for act in ACTS]
        for M in (1, 33, 2048):
            problem = {"M": gemm.m_bucket(M), "N": I, "K": K, "dtype": "bfloat16", "act": "silu"}
            seen = set()  # one config per tile, split and warps: stages change no element's K order
            for config in candidates("gemm_gated", problem):
                c = config["constexprs"]
                if not c.get("WIDE"):
                    continue
                tile = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"], c.get("SELF_REDUCE"),
                        config["num_warps"])
                if tile not in seen:
                    seen.add(tile)
                    cases.append((M, I, K, M == 33, "silu", config))
    recorder = RecordingLauncher()
    for M, I, K, has_bias, act, config in cases:
        _wide_and_pair(*_operands(M, I, K, torch.bfloat16, has_bias, "meta"), act, config, recorder)
    launcher = aot_launcher(recorder.calls, tmp_path)
    for M, I, K, has_bias, act, config in cases:
        _check_wide(M, I, K, torch.bfloat16, has_bias, act, config, launcher, device="cuda", exact=True)
