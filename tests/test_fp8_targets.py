"""CI cross-compiles both FP8 checkpoint layouts for the AMD targets (no GPU needed).

gfx1151 has no FP8 dot: its plans take the a16w8 kernels, with the reason in the decision log.
gfx942 is e4m3fnuz: its plans hold FNUZ weights. Every kernel fits its target and spills nothing.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open

import rdnac
from rdnac.compiler.build import check_resources
from rdnac.plans.binaries import KernelBinary
from rdnac.plans import read_plan
from rdnac.testing.fp8 import write_random_checkpoint


@pytest.fixture(scope="module", params=["fp8-block", "fp8-tensor"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    write_random_checkpoint(path, hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64, intermediate=512,
                            vocab=512, scheme=request.param)
    return request.param, path


@pytest.mark.parametrize("target", ["gfx1201", "gfx1151", "gfx942", "gfx950"])
def test_fp8_checkpoint_cross_compiles(checkpoint, target, tmp_path):
    scheme, path = checkpoint
    plan_path = rdnac.compile(path, target=target, output=tmp_path / "p.msgpack", quiet=True, max_model_len=512,
                              max_num_seqs=8, max_num_batched_tokens=256)
    plan = read_plan(plan_path)
    # the down projection may have taken its activation in (fuse_act_linear, grouped FP8 on GPUs)
    nodes = [n for n in plan.body["graph"]["nodes"] if n["op"] in ("linear_fp8", "gated_act_linear_fp8")]
    assert len(nodes) == 4, f"{scheme} {target}: {len(nodes)} FP8 linears"  # qkv, o, gate_up, down (merged)
    for b in (KernelBinary.from_dict(k) for k in plan.body["kernels"]):
        assert check_resources(b, target) == [], b.key
    fp8_gemms = [KernelBinary.from_dict(k) for k in plan.body["kernels"] if k["kernel"].endswith("gemm_kernel")
                 and "gemm_fp8" in k["kernel"]]
    assert fp8_gemms and all(b.resources.matrix_instructions for b in fp8_gemms)
    decisions = " ".join(f"{d['action']} {d['reason']}" for d in plan.body["decisions"])
    if target == "gfx1151":
        assert all(n["attrs"]["act_scheme"] == "none" for n in nodes)  # a16w8
        assert "a16w8" in decisions
    else:
        # FP8 activations: a linear's act_scheme, or the fused down projection's own group quantization
        assert all(n["attrs"]["act_scheme"] != "none" if n["op"] == "linear_fp8" else n["attrs"]["group"] > 0
                   for n in nodes)
    expected_format = "e4m3fnuz" if target == "gfx942" else "e4m3fn"
    assert all(n["attrs"]["fp8_format"] == expected_format for n in nodes)
    with safe_open(str(plan.weights_path), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert str(w.dtype) == f"torch.float8_{expected_format}"
