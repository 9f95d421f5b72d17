"""`gated_act_linear_fp8` (issue 29): the FP8 down projection computing its own activations, and the pass
`fuse_act_linear` that builds it from `gated_act_quant` + a prequantized `linear_fp8`.

The fused kernel (the block GEMM with GATED_A) must write the bits of the pair it replaces (the activation
kernel, then the prequantized GEMM with the same config), with split-K, SELF_REDUCE and EARLY_WEIGHTS,
and be close to the op's reference; above decode sizes the wrapper runs the pair. On a tiny FP8-block
model the sm90 plan fuses each layer's down projection, and its kernels under the Triton interpreter give
the unfused plan's logits bit for bit; AMD targets cross-compile it (tests/test_fp8_targets.py).
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.compiler.record import RecordingLauncher
from rdnac.ir import ops
from rdnac.ir.fp8 import dequantize_weight
from rdnac.kernels import activation_quant, gemm_fp8
from rdnac.kernels.launch import InterpretLauncher
from rdnac.testing.fp8 import write_random_checkpoint
from tests.test_kernels_gemm_fp8 import TOLERANCES, _operands

INTERPRET = InterpretLauncher()


class _Early:
    """The interpreter with EARLY_WEIGHTS=True on every kernel that takes it (plans add it with PDL only)."""

    def launch(self, kernel, grid, args, *, constexprs, **kw):
        if any(p.name == "EARLY_WEIGHTS" for p in kernel.params):
            constexprs = {**constexprs, "EARLY_WEIGHTS": True}
        INTERPRET.launch(kernel, grid, args, constexprs=constexprs, **kw)


def _inputs(M, N, I, variant, fmt, act_seed=1):
    _, weight, weight_scale, rest, attrs = _operands(M, N, I, torch.bfloat16, True, variant, fmt)
    g = torch.Generator().manual_seed(act_seed)
    gate_up = (torch.randn(M, 2 * I, generator=g) * 2).to(torch.bfloat16)  # [M, 2I]
    if M > 3:
        gate_up[2] = 0  # a zero row: its groups take scale 1
    fused = dict(act="silu", weight_scheme=attrs["weight_scheme"], fp8_format=fmt, group=128,
                 block_size=attrs["block_size"] if attrs["weight_scheme"] == "block" else None, has_bias=True,
                 out_dtype="bfloat16")
    return gate_up, weight, weight_scale, rest, fused


@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("variant,fmt", [("block", "e4m3fn"), ("channel_group", "e4m3fnuz")])
def test_fused_down_projection_is_the_unfused_pair(M, variant, fmt):
    N, I = 256, 320  # a partial last group
    gate_up, weight, weight_scale, rest, attrs = _inputs(M, N, I, variant, fmt)
    ref = ops.gated_act_linear_fp8(gate_up, weight, weight_scale, *rest, **attrs)
    problem = {"I": I, "group": 128, "M": M}
    q, scale = activation_quant.gated_act_quant(gate_up, act="silu", fp8_format=fmt, group=128,
                                                config=activation_quant.default_config(problem), launcher=INTERPRET)
    pair_attrs = {k: v for k, v in attrs.items() if k != "act"}
    act = ops.gated_act(gate_up, act="silu").float()  # [M, I]
    w = dequantize_weight(weight, weight_scale, attrs["weight_scheme"], (128, 128)
                          if attrs["weight_scheme"] == "block" else None)  # [N, I] float32
    atol = TOLERANCES[torch.bfloat16][0]
    for split_k, self_reduce, launcher in ((1, False, INTERPRET), (2, True, _Early()), (2, False, INTERPRET)):
        config = gemm_fp8._config(16, 64, 128, 1, split_k, 4, 2)
        config["constexprs"]["SELF_REDUCE"] = self_reduce
        pair = gemm_fp8.linear_fp8(q, weight, weight_scale, scale, *rest, **pair_attrs, act_scheme="prequantized",
                                   config=config, launcher=INTERPRET)
        out = gemm_fp8.gated_act_linear_fp8(gate_up, weight, weight_scale, *rest, **attrs, config=config,
                                            launcher=launcher)
        what = f"{variant} {fmt} M={M} split_k={split_k} self_reduce={self_reduce}"
        assert out.shape == ref.shape == (M, N) and out.dtype == ref.dtype == torch.bfloat16, what
        assert torch.equal(out, pair), f"{what}: max diff {(out.float() - pair.float()).abs().max():.3g}"
        # against the reference: its activation (torch's silu) may sit a bf16 ulp from the kernels' and so
        # one FP8 code (2**-3 relative at most) away, per element: bounded by |act| @ |W|.T
        err = (out.float() - ref.float()).abs()
        bound = 2.0 ** -3 * (act.abs() @ w.abs().T) + 2.0 ** -7 * ref.float().abs() + atol
        assert (err <= bound).all(), f"{what}: max abs error {err.max():.3g} ({(err > bound).sum()} over the bound)"


@pytest.mark.parametrize("M,fused", [(1, True), (16, True), (17, False), (2048, False)])
def test_the_activation_launch_goes_at_decode_sizes(M, fused):
    _, weight, weight_scale, rest, attrs = _inputs(1, 256, 384, "block", "e4m3fn")
    meta = [t.to("meta") for t in (torch.empty(M, 768, dtype=torch.bfloat16), weight, weight_scale, *rest)]
    rec = RecordingLauncher()
    config = gemm_fp8.default_config({"M": M, "N": 256, "K": 384, "weight_scheme": "block", "act_scheme":
                                      "prequantized", "group": 128, "block_size": [128, 128]})
    gemm_fp8.gated_act_linear_fp8(*meta, **attrs, config=config, launcher=rec)
    kernels = [c.kernel.rpartition(":")[2] for c in rec.calls]
    assert ("_gated_act_quant_kernel" not in kernels) == fused, kernels
    gemms = [c for c in rec.calls if c.kernel.endswith("_fp8_block_gemm_kernel")]
    assert len(gemms) == 1 and (gemms[0].constexprs.get("GATED_A") == "silu") == fused


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("act_linear") / "ckpt"
    write_random_checkpoint(path, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512,
                            vocab=1000, scheme="fp8-block", decisive=True)
    return path


def test_sm90_plan_fuses_and_keeps_the_logits(block_checkpoint, tmp_path):
    """Each layer's down projection takes its activation in (logged); --disable-pass fuse_act_linear keeps the
    pair; the two plans' own kernels under the interpreter give the same logits bit for bit."""
    opts = dict(quiet=True, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32)
    on = rdnac.load(rdnac.compile(block_checkpoint, "sm90", tmp_path / "on.msgpack", **opts), interpret=True)
    off = rdnac.load(rdnac.compile(block_checkpoint, "sm90", tmp_path / "off.msgpack",
                                   disable_passes=("fuse_act_linear",), **opts), interpret=True)
    ops_on, ops_off = on.graph.op_counts(), off.graph.op_counts()
    assert ops_on.get("gated_act_linear_fp8") == 2 and "gated_act_quant" not in ops_on
    assert ops_off.get("gated_act_quant") == 2 and "gated_act_linear_fp8" not in ops_off
    assert ops_on["linear_fp8"] == ops_off["linear_fp8"] - 2
    decided = [d for d in on.plan.body["decisions"] if d["pass"] == "fuse_act_linear"]
    assert sorted(d["node"] for d in decided) == ["layers.0.down_proj", "layers.1.down_proj"], decided
    skipped = [d for d in off.plan.body["decisions"] if d["pass"] == "fuse_act_linear"]
    assert [(d["action"], d["reason"]) for d in skipped] == [("skipped", "disabled with --disable-pass")]
    kernels = {k["kernel"].rpartition(":")[2]: k["call"]["constexprs"] for k in on.plan.body["kernels"]
               if k["call"]["constexprs"].get("GATED_A")}
    assert kernels, "the decode steps run the fused GEMM"
    prompt = [(37 * i) % 990 + 5 for i in range(9)]
    a, b = on.logits(prompt), off.logits(prompt)
    assert a.shape == b.shape == (len(prompt), 1000)
    assert torch.equal(a, b), f"fused vs unfused logits differ by {(a - b).abs().max():.3g}"


def test_sm90_plans_record_early_weight_loads(block_checkpoint, tmp_path):
    """With PDL the FP8 block GEMMs (the fused down projection too) are built with EARLY_WEIGHTS and the log
    says so; --disable-pass early_weight_loads and AMD targets (no PDL) build none."""
    from rdnac.plans import read_plan

    def early(target, **kw):
        plan = read_plan(rdnac.compile(block_checkpoint, target, tmp_path / f"{target}{len(kw)}.msgpack", quiet=True,
                                       max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32, **kw))
        flags = {k["call"]["constexprs"].get("EARLY_WEIGHTS", False) for k in plan.body["kernels"]
                 if k["kernel"].endswith(":_fp8_block_gemm_kernel")}
        launch = [d["action"] for d in plan.body["decisions"] if d["pass"] == "launch" and "weight" in d["action"]]
        return plan.body["runtime"]["early_weights"], flags, launch

    assert early("sm90") == (True, {True}, ["early weight loads on"])
    assert early("sm90", disable_passes=("early_weight_loads",)) == (False, {False}, ["early weight loads off"])
    assert early("gfx942") == (False, {False}, [])
