"""RMSNorm in the GEMM that reads it (`rms_norm_linear`, pass `fuse_norm_linear`).

Kernels run under the Triton interpreter against the unfused pair (the norm kernel, then the GEMM with the same
config: within the output dtype's rounding, h bit for bit) and against the IR reference, at decode sizes (the
norm prologue: plain, split-K with and without SELF_REDUCE, the gated node's fused, WIDE and UNFUSED forms) and a
prefill size (the norm kernel then the GEMM). The pass is checked on hand-built graphs (what fuses, what is kept
and why) and on tiny Llama and Qwen3 checkpoints: cpu plans fused vs unfused bit for bit and against
transformers, sm90 plans under the interpreter, --disable-pass. The `gpu` test runs Qwen3-8B's shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import rdnac
from rdnac.compiler.passes import PassContext, fuse_norm_linear
from rdnac.ir import interpreter, ops
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec
from rdnac.ir.verify import verify
from rdnac.kernels import gemm, gemm_gated, norm_gemm, rms_norm
from rdnac.kernels.launch import InterpretLauncher, JitLauncher, RecordingLauncher
from tests.support.checkpoints import make_checkpoint, reference_greedy, reference_logits

INTERPRET = InterpretLauncher()
PASS = "fuse_norm_linear"
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
EPS = 1e-6
# (atol relative to the output's max, rtol) against the IR reference in float32 from the same inputs
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 4e-2)}


def _self_reduce(cfg: dict) -> dict:
    return {**cfg, "constexprs": {**cfg["constexprs"], "SELF_REDUCE": True}}


# decode (BLOCK_K 64 does not divide K = 200): one tile; split-K with its reduce kernel; split-K self-reducing
LINEAR_DECODE = {"plain": gemm._config(16, 32, 64, 1, 1, 4, 2), "split_k": gemm._config(16, 32, 64, 1, 2, 4, 2),
                 "self_reduce": _self_reduce(gemm._config(16, 64, 64, 1, 2, 4, 3))}
GATED_DECODE = {"fused": gemm_gated.from_gemm_configs([gemm._config(16, 64, 64, 1, 1, 4, 2)])[0],
                "wide": gemm_gated.wide_configs([_self_reduce(gemm._config(16, 64, 64, 1, 2, 4, 2))])[0],
                "unfused": gemm_gated.unfused_configs([gemm._config(16, 64, 64, 1, 1, 4, 2)], {"N": 48})[0]}


def _operands(M, K, N, dtype, has_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)  # [M, K]
    residual = torch.randn(M, K, generator=g).to(dtype) if has_residual else None  # [M, K]
    norm_w = (torch.rand(K, generator=g) + 0.5).to(dtype)  # [K]
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)  # [N, K]
    return x, residual, norm_w, w


def _unfused_pair(x, residual, norm_w, w, act, unit_offset, config):
    """The norm kernel (its family default), then the GEMM with the same config."""
    norm_config = rms_norm.default_config({"H": x.shape[1], "num_heads": 1})
    out = rms_norm.rms_norm(x, *([residual] if residual is not None else []), norm_w, eps=EPS,
                            unit_offset=unit_offset, config=norm_config, launcher=INTERPRET)
    y, h = out if residual is not None else (out, None)
    gemm_config = {k: v for k, v in config.items() if k != "norm"}
    if act:
        return gemm_gated.linear_gated_act(y, w, act=act, config=gemm_config, launcher=INTERPRET), h
    return gemm.linear(y, w, config=gemm_config, launcher=INTERPRET), h


def _check(M, K, N, act, config, has_residual, unit_offset, dtype=torch.bfloat16):
    x, residual, norm_w, w = _operands(M, K, N, dtype, has_residual)
    inputs = [x, *([residual] if has_residual else []), norm_w, w]
    what = f"rms_norm_linear M={M} K={K} N={N} act={act!r} residual={has_residual} unit_offset={unit_offset} {config}"
    out = norm_gemm.rms_norm_linear(*inputs, eps=EPS, has_residual=has_residual, act=act, unit_offset=unit_offset,
                                    config=config, launcher=INTERPRET)
    z, h = out if has_residual else (out, None)
    width = N // 2 if act else N
    assert z.shape == (M, width) and z.dtype == dtype, f"{what}: {tuple(z.shape)} {z.dtype}"
    pair_z, pair_h = _unfused_pair(x, residual, norm_w, w, act, unit_offset, config)
    if has_residual:
        assert h.shape == (M, K) and h.dtype == dtype, f"{what}: h {tuple(h.shape)} {h.dtype}"
        assert torch.equal(h, pair_h), f"{what}: h differs from the norm kernel's"
    # rstd's float32 sum runs in another order: a normalized element may move by one rounding
    eps, scale = torch.finfo(dtype).eps, pair_z.float().abs().max().item()
    err = (z.float() - pair_z.float()).abs().max().item()
    assert torch.allclose(z.float(), pair_z.float(), rtol=2 * eps, atol=2 * eps * scale), \
        f"{what}: differs from the unfused pair by up to {err:.3g}"
    # the IR reference in float32 from the same inputs (bf16 rounds h, y, w * y and the output; the
    # interpreter's float32 -> bf16 casts truncate, so h is held to one rounding here, to its bits on the GPU)
    ref = ops.rms_norm_linear(*(t.float() for t in inputs), eps=EPS, has_residual=has_residual, act=act,
                              unit_offset=unit_offset)
    ref_z, ref_h = ref if has_residual else (ref, None)
    atol, rtol = TOLERANCES[dtype]
    err = (z.float() - ref_z).abs().max().item()
    assert torch.allclose(z.float(), ref_z, rtol=rtol, atol=atol * scale), \
        f"{what}: differs from the IR reference by up to {err:.3g}"
    if has_residual:
        err = (h.float() - ref_h).abs().max().item()
        assert torch.allclose(h.float(), ref_h, rtol=eps, atol=0), f"{what}: h differs from x + residual by {err:.3g}"


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("M", [1, 2, 3, 16])
@pytest.mark.parametrize("form", list(LINEAR_DECODE))
@pytest.mark.parametrize("has_residual,unit_offset", [(True, False), (False, True)])
def test_linear_decode_prologue(M, form, has_residual, unit_offset):
    _check(M, 200, 96, "", LINEAR_DECODE[form], has_residual, unit_offset)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("form", list(GATED_DECODE))
@pytest.mark.parametrize("has_residual,unit_offset", [(True, False), (False, True)])
def test_gated_decode_prologue(M, form, has_residual, unit_offset):
    _check(M, 200, 96, "silu", GATED_DECODE[form], has_residual, unit_offset)


def test_fp32_and_a_second_row_tile():
    # float32 plans; M = 20 over two 16-row tiles (each tile's first-column programs store its rows of h)
    _check(20, 72, 48, "", LINEAR_DECODE["self_reduce"], True, False, dtype=torch.float32)
    _check(20, 72, 96, "gelu_tanh", GATED_DECODE["fused"], True, True, dtype=torch.float32)


@pytest.mark.parametrize("act", ["", "silu"])
@pytest.mark.parametrize("has_residual", [True, False])
def test_prefill_runs_the_norm_kernel_then_the_gemm(act, has_residual):
    problem = {"M": 40, "N": 48 if act else 96, "K": 200, "dtype": "bfloat16"}
    family = gemm_gated if act else gemm
    ranked = norm_gemm.with_norm_configs([(family.config_space(problem)[0], "first")], problem)
    (config, reason), = ranked
    assert config["norm"] == rms_norm.default_config({"H": 200, "num_heads": 1}) and "two launches" in reason
    _check(40, 200, 96, act, config, has_residual, False)
    decode, = norm_gemm.with_norm_configs([(LINEAR_DECODE["plain"], "first")], dict(problem, M=16))
    assert "norm" not in decode[0] and "one launch" in decode[1]


def test_launch_counts_on_meta_tensors():
    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731

    def kernels(M, N, act, config):
        rec = RecordingLauncher()
        norm_gemm.rms_norm_linear(meta(M, 64), meta(M, 64), meta(64), meta(N, 64), eps=EPS, has_residual=True,
                                  act=act, config=config, launcher=rec)
        return [(c.kernel.split(":")[1], c.constexprs.get("NORM", False)) for c in rec.calls]

    assert kernels(1, 96, "", LINEAR_DECODE["plain"]) == [("_gemm_kernel", True)]
    assert kernels(1, 96, "", LINEAR_DECODE["self_reduce"]) == [("_gemm_kernel", True)]
    assert kernels(1, 96, "", LINEAR_DECODE["split_k"]) == [("_gemm_kernel", True), ("_splitk_reduce_kernel", False)]
    assert kernels(1, 96, "silu", GATED_DECODE["fused"]) == [("_gemm_gated_kernel", True)]
    assert kernels(1, 96, "silu", GATED_DECODE["wide"]) == [("_gemm_kernel", True)]
    assert kernels(1, 96, "silu", GATED_DECODE["unfused"]) == [("_gemm_kernel", True), ("_gated_act_kernel", False)]
    prefill = {**LINEAR_DECODE["plain"], "norm": rms_norm.default_config({"H": 64})}
    assert kernels(40, 96, "", prefill) == [("_rms_norm_kernel", False), ("_gemm_kernel", False)]


def test_bad_inputs_name_the_tensor():
    x, residual, norm_w, w = _operands(2, 64, 32, torch.bfloat16, True)
    call = lambda *ins: norm_gemm.rms_norm_linear(*ins, eps=EPS, has_residual=True,  # noqa: E731
                                                  config=LINEAR_DECODE["plain"], launcher=INTERPRET)
    with pytest.raises(AssertionError, match=r"norm weight must be \[64\]"):
        call(x, residual, norm_w[:-1], w)
    with pytest.raises(AssertionError, match="norm weight must be"):
        call(x, residual, norm_w.float(), w)
    with pytest.raises(AssertionError, match="residual must be"):
        call(x, residual[:1], norm_w, w)
    with pytest.raises(AssertionError, match="disagree on K"):
        call(x, residual, norm_w, w[:, :32])


# ---------------------------------------------------------------- the pass


def _graph(*, has_residual=True, gated=False, extra_reader=False, y_output=False, dtype="float32"):
    """x (+ r) -> rms_norm -> linear or linear_gated_act (K = 24, N = 40)."""
    K, N = 24, 40
    g = torch.Generator().manual_seed(0)
    cast = getattr(torch, dtype)
    weights = {"nw": (torch.rand(K, generator=g) + 0.5).to(cast),
               "w": (torch.randn(N, K, generator=g) / math.sqrt(K)).to(cast)}
    specs = {"nw": WeightSpec(dtype, (K,)), "w": WeightSpec(dtype, (N, K))}
    inputs = {"x": TensorSpec("float32", ("T", K))}
    norm_ins = ["x", "nw"]
    norm_outs = ["y"]
    if has_residual:
        inputs["r"] = TensorSpec("float32", ("T", K))
        norm_ins, norm_outs = ["x", "r", "nw"], ["y", "h"]
    gemm = Node("proj", "linear_gated_act", ["y", "w"], ["z"], {"act": "silu"}) if gated else \
        Node("proj", "linear", ["y", "w"], ["z"], {})
    nodes = [Node("norm", "rms_norm", norm_ins, norm_outs, {"eps": EPS}), gemm]
    outputs = ["z", *norm_outs[1:]]
    if extra_reader:
        nodes.append(Node("y2", "add", ["y", "y"], ["y2"], {}))
        outputs.append("y2")
    if y_output:
        outputs.append("y")
    graph = Graph(inputs=inputs, weights=specs, nodes=nodes, outputs=outputs)
    verify(graph)
    return graph, weights


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("gated", [False, True])
def test_pass_fuses_and_matches_the_reference(has_residual, gated):
    graph, weights = _graph(has_residual=has_residual, gated=gated)
    g = torch.Generator().manual_seed(1)
    step = {"x": torch.randn(7, 24, generator=g), "r": torch.randn(7, 24, generator=g)}
    before = interpreter.run(graph, weights, step)
    ctx = PassContext(target="cpu")
    fused = fuse_norm_linear.run(graph, ctx)
    verify(fused)
    norm_ins = ["x", "r", "nw"] if has_residual else ["x", "nw"]
    assert [(n.name, n.op, n.inputs, n.outputs) for n in fused.nodes] == \
        [("proj", "rms_norm_linear", [*norm_ins, "w"], ["z", *(["h"] if has_residual else [])])]
    assert fused.nodes[0].attrs == {"eps": EPS, "has_residual": has_residual, "act": "silu" if gated else ""}
    assert [(d["pass"], d["node"]) for d in ctx.decisions] == [(PASS, "proj")]
    assert ctx.decisions[0]["action"].startswith("fused norm")
    after = interpreter.run(fused, weights, step)
    for name in fused.outputs:
        assert after[name].shape == before[name].shape and torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("variant,why", [("extra_reader", "y is read by 2 nodes, not one GEMM"),
                                         ("y_output", "y is a graph output"),
                                         ("mixed_dtype", "requires one float dtype")])
def test_pass_keeps_and_says_why(variant, why):
    graph, _ = _graph(extra_reader=variant == "extra_reader", y_output=variant == "y_output",
                      dtype="bfloat16" if variant == "mixed_dtype" else "float32")
    ops_before = [n.op for n in graph.nodes]
    ctx = PassContext(target="cpu")
    assert [n.op for n in fuse_norm_linear.run(graph, ctx).nodes] == ops_before
    assert len(ctx.decisions) == 1 and ctx.decisions[0]["action"] == "kept"
    assert why in ctx.decisions[0]["reason"], ctx.decisions[0]["reason"]


def test_pass_leaves_fp8_plans_alone():
    graph, _ = _graph()
    graph.nodes.append(Node("q", "linear_fp8", ["z", "w8", "s"], ["q"],
                            {"weight_scheme": "tensor", "act_scheme": "none", "fp8_format": "e4m3fn"}))
    graph.weights.update(w8=WeightSpec("float8_e4m3fn", (8, 40)), s=WeightSpec("float32", (1,)))
    ctx = PassContext(target="cpu")
    assert [n.op for n in fuse_norm_linear.run(graph, ctx).nodes] == ["rms_norm", "linear", "linear_fp8"]
    assert [(d["node"], d["action"]) for d in ctx.decisions] == [("-", "skipped")]
    assert "FP8 plan" in ctx.decisions[0]["reason"]


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_plans(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"norm_linear_{family}")
    model = make_checkpoint(family, root / "ckpt")
    on = rdnac.compile(root / "ckpt", output=root / "on.msgpack")
    off = rdnac.compile(root / "ckpt", output=root / "off.msgpack", disable_passes=(PASS,))
    return family, root, model, on, off


def test_cpu_plans_match_transformers_and_the_unfused_plan(family_plans):
    family, _, model, on_path, off_path = family_plans
    on, off = rdnac.load(on_path), rdnac.load(off_path)
    layers = model.config.num_hidden_layers
    # per layer: the attention's norm into qkv, the MLP's into gate_up; the final norm feeds logits
    assert on.graph.op_counts()["rms_norm_linear"] == 2 * layers and on.graph.op_counts()["rms_norm"] == 1
    assert off.graph.op_counts()["rms_norm"] == 2 * layers + 1 and "rms_norm_linear" not in off.graph.op_counts()
    ours = on.logits(PROMPT)
    ref = reference_logits(model, PROMPT)
    assert ours.shape == ref.shape == (len(PROMPT), model.config.vocab_size) and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"{family}: max abs logit error {err:.3g}"
    assert torch.equal(ours, off.logits(PROMPT)), family
    assert on.generate([PROMPT], max_tokens=8)[0].token_ids == reference_greedy(model, PROMPT, 8)
    skipped = [d for d in off.plan.body["decisions"] if d["pass"] == PASS]
    assert [(d["action"], d["reason"]) for d in skipped] == [("skipped", "disabled with --disable-pass")]
    kept = [d for d in on.plan.body["decisions"] if d["pass"] == PASS and d["action"] == "kept"]
    assert [(d["node"], d["reason"]) for d in kept] == \
        [("final_norm", "final_norm is read by logits (logits), not a linear or linear_gated_act")]


def test_sm90_plan_runs_under_the_interpreter(family_plans, tmp_path):
    family, root, model, on_path, _ = family_plans
    opts = dict(quiet=True, max_model_len=256, max_num_seqs=2, max_num_batched_tokens=32)
    path = rdnac.compile(root / "ckpt", "sm90", tmp_path / "sm90.msgpack", **opts)
    plan = rdnac.load(path, interpret=True)
    program = plan.plan.body["program"]
    for node in ("layers.0.qkv_proj", "layers.0.gate_up_proj"):
        for key, choice in program[node].items():
            assert choice["kernel"] == "norm_gemm.rms_norm_linear"
            is_decode_size = int(key.split(":")[1]) <= gemm.DECODE_MAX_M
            assert ("norm" in choice["config"]) != is_decode_size, (node, key, choice)
    rejected = [d for d in plan.plan.body["decisions"] if d["pass"] == "select_kernels"
                and d["action"].startswith("rejected") and d["node"].endswith(("qkv_proj", "gate_up_proj"))]
    assert rejected == [], rejected
    kernels = {k["kernel"].rpartition(":")[2] for k in plan.plan.body["kernels"]
               if k["call"]["constexprs"].get("NORM")}
    assert kernels == {"_gemm_kernel", "_gemm_gated_kernel"}, kernels
    # the plan's own kernels (bf16, interpreted) against transformers, prefill and decode steps
    ours, ref = plan.logits(PROMPT).float(), reference_logits(model, PROMPT)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    assert cosine >= 0.995, f"{family}: sm90 plan (bf16, interpreted) vs transformers cosine {cosine:.4f}"
    off = rdnac.load(rdnac.compile(root / "ckpt", "sm90", tmp_path / "off.msgpack", disable_passes=(PASS,), **opts),
                     interpret=True)
    assert len(program) == len(off.plan.body["program"]) - 2 * model.config.num_hidden_layers
    prompts = [PROMPT, PROMPT[:4]]
    assert [c.token_ids for c in plan.generate(prompts, max_tokens=3)] == \
        [c.token_ids for c in off.generate(prompts, max_tokens=3)]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_decode_kernels_gpu_match_the_unfused_pair():
    """Qwen3-8B decode: qkv [6144, 4096] and gate_up [2 x 12288, 4096] at M = 1 and 4, every decode config of
    the space (split-K with and without SELF_REDUCE; the gated fused, WIDE and UNFUSED forms), with the
    residual; h bit for bit, z within two roundings of the unfused pair (max error printed)."""
    jit, K, worst = JitLauncher(), 4096, 0.0
    for M in (1, 4):
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        residual = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        norm_w = (torch.rand(K, generator=g) + 0.5).to("cuda", torch.bfloat16)
        norm_config = rms_norm.default_config({"H": K, "num_heads": 1})
        y, pair_h = rms_norm.rms_norm(x, residual, norm_w, eps=EPS, config=norm_config, launcher=jit)
        for act, N in (("", 6144), ("silu", 24576)):
            w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to("cuda", torch.bfloat16)
            merged = gemm.config_space({"M": M, "N": N, "K": K})
            merged += [_self_reduce(c) for c in merged if c["constexprs"]["SPLIT_K"] > 1]
            if act:
                problem = {"M": M, "N": N // 2, "K": K}
                configs = gemm_gated.config_space(problem) + gemm_gated.wide_configs(merged) + \
                    gemm_gated.unfused_configs([c for c in merged if c["constexprs"]["SPLIT_K"] == 1], problem)
            else:
                configs = merged
            for config in configs:
                z, h = norm_gemm.rms_norm_linear(x, residual, norm_w, w, eps=EPS, has_residual=True, act=act,
                                                 config=config, launcher=jit)
                if act:
                    pair_z = gemm_gated.linear_gated_act(y, w, act=act, config=config, launcher=jit)
                else:
                    pair_z = gemm.linear(y, w, config=config, launcher=jit)
                what = f"M={M} N={N} act={act!r} {config}"
                assert torch.equal(h, pair_h), f"{what}: h differs"
                eps, scale = torch.finfo(torch.bfloat16).eps, pair_z.float().abs().max().item()
                err = (z.float() - pair_z.float()).abs().max().item()
                worst = max(worst, err / scale)
                assert torch.allclose(z.float(), pair_z.float(), rtol=2 * eps, atol=2 * eps * scale), \
                    f"{what}: differs from the unfused pair by up to {err:.3g}"
    print(f"\nworst |fused - unfused| / max|unfused| over all decode configs: {worst:.3g}")
