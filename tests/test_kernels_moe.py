"""Fused MoE family (`moe_route`, `moe_experts`, `moe_experts_mxfp4`) against the IR references (rdnac.ir.moe).

Under the Triton interpreter on tiny odd shapes: routing ids exactly and weights to 1e-6; the expert
MLP in float32 to 1e-4 (the kernel differs from the reference only in summation order) and in bf16
within the rounding of its [T*k, I] intermediate and its output. MXFP4 weights use scales spread far
from 127, and the e2m1 / e8m0 decoding is checked bit for bit against the reference codec for every
code and scale byte. Cross-compiles for every GPU target, the LDS rejection of a tile too big for
gfx942, and a hand-built MoE graph through kernel selection run on CPU; the `gpu` tests (the H100)
check decode and prefill sizes and a captured decode step.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from rdnac.compiler import cost_model
from rdnac.ir import moe as ref
from rdnac.ir import mxfp4
from rdnac.kernels import moe, moe_route
from rdnac.kernels.launch import InterpretLauncher, JitLauncher
from rdnac.kernels.moe_configs import experts_config_space, experts_default_config, lds_bytes
from rdnac.kernels.moe_gemm import e2m1_to_float, e8m0_to_float
from rdnac.targets import get_target

INTERPRET = InterpretLauncher()
ROUTE_CONFIG = {"constexprs": {}, "num_warps": 1, "num_stages": 1}
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}  # (atol, rtol)
GPU_TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")


def _config(block_m, block_n, block_k, num_warps=4, num_stages=2):
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
            "num_warps": num_warps, "num_stages": num_stages}


def _problem(T, E, H, I, k, dtype="bfloat16", weight_format="dense", act="silu"):
    return {"op": "moe_experts", "M": T, "E": E, "H": H, "I": I, "top_k": k, "dtype": dtype,
            "weight_format": weight_format, "has_bias": False, "act": act}


def _assert_close(out, expected, dtype, what, tolerances=None):
    atol, rtol = tolerances or TOLERANCES[dtype]
    atol *= max(1.0, expected.abs().max().item())  # MXFP4 test weights with spread scales give outputs >> 1
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    err = (out.float() - expected.float()).abs().max().item()
    assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol), \
        f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol})"


def _experts(E, H, I, seed, device="cpu"):
    """w13 [E, 2I, H], w2 [E, H, I], b13, b2 in float32, scaled so every output is O(1)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    b13 = torch.randn(E, 2 * I, generator=g) * 0.5
    b2 = torch.randn(E, H, generator=g) * 0.5
    return [t.to(device) for t in (w13, w2, b13, b2)]


def _routing(T, E, k, seed, experts=None):
    """(weights [T, k] f32, ids [T, k] int32): k distinct experts per token, from `experts` if given."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(E))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]).to(torch.int32)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


def _check_experts(T, E, H, I, k, act, dtype, has_bias, config, *, experts=None, seed=0, mxfp4_weights=False,
                   launcher=INTERPRET, device="cpu", tolerances=None):
    w13, w2, b13, b2 = _experts(E, H, I, seed, device)
    weights, ids = (t.to(device) for t in _routing(T, E, k, seed, experts))
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    biases = (b13, b2) if has_bias else ()
    attrs = dict(act=act, alpha=1.702, limit=7.0)
    if mxfp4_weights:
        q13, q2 = mxfp4.quantize(_spread(w13)), mxfp4.quantize(_spread(w2))
        out = moe.moe_experts_mxfp4(x, weights, ids, *q13, *q2, *biases, **attrs, config=config, launcher=launcher)
        expected = ref.moe_experts_mxfp4(x.float(), weights, ids, *q13, *q2, *biases, **attrs)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
        out = moe.moe_experts(x, weights, ids, w13, w2, *biases, **attrs, config=config, launcher=launcher)
        expected = ref.moe_experts(x.float(), weights, ids, w13.float(), w2.float(), *biases, **attrs)
    what = f"moe_experts T={T} E={E} H={H} I={I} k={k} {act} {dtype} bias={has_bias} mxfp4={mxfp4_weights} {config}"
    _assert_close(out, expected.to(dtype), dtype, what, tolerances)
    return out


def _spread(w):
    """w with its 32-element blocks rescaled by 8 * 2**(-4..4) in turn: MXFP4 scales on both sides of 127."""
    blocks = w.reshape(-1, 32)
    factors = 8 * 2.0 ** (torch.arange(blocks.shape[0]) % 9 - 4).float()
    return (blocks * factors[:, None]).reshape(w.shape)


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("scoring,renormalize", [("softmax_topk", True), ("softmax_topk", False),
                                                 ("topk_softmax", False)])
@pytest.mark.parametrize("E,k", [(8, 2), (13, 4), (16, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_route_matches_reference(scoring, renormalize, E, k, dtype):
    logits = torch.randn(7, E, generator=torch.Generator().manual_seed(E * k)).to(dtype)
    weights, ids = moe_route.moe_route(logits, top_k=k, scoring=scoring, renormalize=renormalize,
                                       config=ROUTE_CONFIG, launcher=INTERPRET)
    ref_weights, ref_ids = ref.moe_route(logits, top_k=k, scoring=scoring, renormalize=renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids), f"{scoring}: ids {ids.tolist()} != {ref_ids.tolist()}"
    _assert_close(weights, ref_weights, torch.float32, f"route {scoring} E={E} k={k}", (1e-6, 1e-6))


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_route_exact_ties_pick_the_lower_id(scoring):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0, 2.0, 2.0],
                           [0.0] * 8,
                           [2.0, 2.0, 5.0, 2.0, 2.0, 2.0, 2.0, 5.0]])
    weights, ids = moe_route.moe_route(logits, top_k=3, scoring=scoring, renormalize=True,
                                       config=ROUTE_CONFIG, launcher=INTERPRET)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [2, 7, 0]]
    assert torch.equal(ids, ref.moe_route(logits, top_k=3, scoring=scoring, renormalize=True)[1])
    _assert_close(weights, ref.moe_route(logits, top_k=3, scoring=scoring, renormalize=True)[0], torch.float32,
                  "ties", (1e-6, 1e-6))


# ---------------------------------------------------------------- sort / align


@pytest.mark.parametrize("block_m", [16, 64])
def test_sort_groups_slots_by_expert_in_slot_order(block_m):
    T, E, k = 9, 12, 3
    _, ids = _routing(T, E, k, seed=3, experts=[0, 1, 5, 7, 11])  # experts 2-4, 6, 8-10 get nothing
    sorted_slots, block_expert, num_padded = moe.sort_slots(ids, E, block_m, INTERPRET)
    assert sorted_slots.shape == (moe.sort_bound(T * k, E, block_m),) and sorted_slots.shape[0] % block_m == 0
    flat = ids.flatten()
    start = 0
    for e in range(E):
        mine = torch.nonzero(flat == e).flatten().to(torch.int32)  # slot order
        padded = -(-len(mine) // block_m) * block_m
        assert torch.equal(sorted_slots[start:start + len(mine)], mine), f"expert {e}"
        assert (sorted_slots[start + len(mine):start + padded] == T * k).all(), f"expert {e}: padding"
        assert (block_expert[start // block_m:(start + padded) // block_m] == e).all()
        start += padded
    assert num_padded.tolist() == [start]


# ---------------------------------------------------------------- expert MLP


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "swiglu_oai"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_experts_float32_every_act(act, has_bias):
    _check_experts(T=7, E=8, H=96, I=48, k=2, act=act, dtype=torch.float32, has_bias=has_bias,
                   config=_config(16, 32, 32))


@pytest.mark.parametrize("E,k", [(8, 2), (16, 4)])
def test_experts_bfloat16(E, k):
    _check_experts(T=5, E=E, H=160, I=96, k=k, act="silu", dtype=torch.bfloat16, has_bias=True,
                   config=_config(16, 64, 64))


def test_experts_all_tokens_to_the_same_experts_and_experts_without_tokens():
    # 33 tokens, 4 choices each, all from the same 4 of 16 experts: one expert's rows span several blocks
    # (and the odd sizes mask rows, columns and the K tail); 12 experts get no row at all.
    _check_experts(T=33, E=16, H=80, I=48, k=4, act="gelu_tanh", dtype=torch.float32, has_bias=True,
                   config=_config(16, 32, 32), experts=[3, 9, 10, 15])


def test_experts_prefill_tile_and_one_token():
    _check_experts(T=41, E=8, H=64, I=64, k=2, act="silu", dtype=torch.float32, has_bias=False,
                   config=_config(64, 64, 64))
    _check_experts(T=1, E=16, H=64, I=32, k=4, act="swiglu_oai", dtype=torch.float32, has_bias=True,
                   config=_config(16, 32, 64))


def test_experts_every_decode_candidate():
    T, E, H, I, k = 3, 8, 96, 64, 2
    for config in experts_config_space(_problem(T, E, H, I, k)):
        _check_experts(T, E, H, I, k, "silu", torch.float32, True, config)


def test_experts_are_deterministic():
    args = dict(T=9, E=8, H=64, I=32, k=4, act="silu", dtype=torch.bfloat16, has_bias=True, config=_config(16, 32, 32))
    assert torch.equal(_check_experts(**args), _check_experts(**args))


# ---------------------------------------------------------------- MXFP4


@triton.jit
def _decode_kernel(codes_ptr, scales_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    value = e2m1_to_float(tl.load(codes_ptr + offs).to(tl.int32))
    scale = e8m0_to_float(tl.load(scales_ptr + offs).to(tl.int32))
    tl.store(out_ptr + offs, value * scale)


def test_mxfp4_decoding_is_bit_exact_for_every_code_and_scale():
    """Every e2m1 code times every e8m0 scale byte but NaN's 255, against the reference codec: a scale read
    as a value (or zeroed) would be off by orders of magnitude, a misread nibble by a code."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(255)  # [16 * 255]
    scales = torch.arange(255, dtype=torch.uint8).repeat_interleave(16)
    n = triton.next_power_of_2(codes.numel())
    out = torch.zeros(n, dtype=torch.float32)
    pad = lambda t: torch.cat([t, torch.zeros(n - t.numel(), dtype=t.dtype)])  # noqa: E731
    INTERPRET.launch(_decode_kernel, (1,), (pad(codes), pad(scales), out), constexprs=dict(N=n))
    # the reference: one 32-element block per scale byte, the 16 codes as its low nibbles (even elements)
    expected = mxfp4.dequantize(codes.reshape(255, 16), scales.reshape(255, 16)[:, :1].contiguous())[:, 0::2]
    got = out[:codes.numel()].reshape(255, 16)
    assert torch.equal(got, expected) and torch.equal(torch.signbit(got), torch.signbit(expected))


@pytest.mark.parametrize("act,has_bias", [("swiglu_oai", True), ("silu", False)])
def test_experts_mxfp4_float32(act, has_bias):
    """MXFP4 weights with scales 118..135 (not all 127): a kernel that read scales as 1 (or 0) fails."""
    w13 = _experts(8, 96, 64, 0)[0]
    scales = mxfp4.quantize(_spread(w13))[1]
    assert scales.min() < 124 and scales.max() > 130, (scales.min(), scales.max())
    _check_experts(T=7, E=8, H=96, I=64, k=2, act=act, dtype=torch.float32, has_bias=has_bias,
                   config=_config(16, 32, 64), mxfp4_weights=True)


def test_experts_mxfp4_bfloat16_top4():
    _check_experts(T=6, E=16, H=128, I=64, k=4, act="swiglu_oai", dtype=torch.bfloat16, has_bias=True,
                   config=_config(16, 64, 128), mxfp4_weights=True)


def test_a_wrong_scale_byte_changes_the_output():
    """One scale byte of one used expert raised by one doubles its block: the kernel's output moves as the
    reference's does (guards against scales being ignored or clamped)."""
    T, E, H, I, k = 3, 8, 64, 32, 2
    w13, w2, _, _ = _experts(E, H, I, 0)
    weights, ids = _routing(T, E, k, 0)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    q13, q2 = list(mxfp4.quantize(w13)), list(mxfp4.quantize(w2))
    e = int(ids[0, 0])
    q2[1] = q2[1].clone()
    q2[1][e, :, 0] += 1
    config = _config(16, 32, 32)
    out = moe.moe_experts_mxfp4(x, weights, ids, *q13, *q2, act="silu", config=config, launcher=INTERPRET)
    expected = ref.moe_experts_mxfp4(x, weights, ids, *q13, *q2, act="silu")
    before = ref.moe_experts_mxfp4(x, weights, ids, *q13, *mxfp4.quantize(w2), act="silu")
    assert (expected - before).abs().max() > 1e-3
    _assert_close(out, expected, torch.float32, "mxfp4 with one scale raised")


# ---------------------------------------------------------------- shapes only


class _Recorder:
    def __init__(self):
        self.launches = []

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        self.launches.append((kernel.fn.__name__, grid, constexprs))


def test_wrappers_run_on_meta_tensors_with_grids_from_shapes():
    T, E, H, I, k = 5, 16, 256, 128, 4
    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    rec = _Recorder()
    weights, ids = moe_route.moe_route(meta(T, E), top_k=k, scoring="softmax_topk", config=ROUTE_CONFIG, launcher=rec)
    assert weights.shape == ids.shape == (T, k) and ids.dtype == torch.int32 and weights.dtype == torch.float32
    config = _config(16, 64, 64)
    out = moe.moe_experts(meta(T, H), weights, ids, meta(E, 2 * I, H), meta(E, H, I), act="silu", config=config,
                          launcher=rec)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16 and out.is_meta
    blocks = moe.sort_bound(T * k, E, 16) // 16
    assert blocks == -(-(T * k + min(E, T * k) * 15) // 16)
    assert [(name, grid) for name, grid, _ in rec.launches] == [
        ("_moe_route_kernel", (T,)), ("_moe_count_kernel", (E,)), ("_moe_align_kernel", (E,)),
        ("_moe_gemm_kernel", (blocks, I // 64)), ("_moe_gemm_kernel", (blocks, H // 64)), ("_moe_sum_kernel", (T, 1))]


def test_config_spaces_per_phase():
    for T, block_ms in ((1, {16}), (64, {16}), (256, {32, 64}), (2048, {64, 128})):
        problem = _problem(T, 32, 2880, 2880, 4)
        space = experts_config_space(problem)
        assert experts_default_config(problem) in space
        assert {c["constexprs"]["BLOCK_M"] for c in space} == block_ms
        assert all(c["constexprs"]["BLOCK_K"] % 32 == 0 for c in space)


def test_cost_model_reads_only_active_experts_and_rejects_tiles_over_lds():
    problem = _problem(1, 128, 2048, 768, 8)
    est = cost_model.estimate("moe", problem, experts_default_config(problem), get_target("gfx942"))
    # batch 1: 8 of 128 experts, 3 * 768 * 2048 bf16 weights each
    assert 8 * 3 * 768 * 2048 * 2 <= est.bytes_moved < 8 * 3 * 768 * 2048 * 2 * 1.05, est
    assert "8.0 of 128 experts active" in est.reason
    mx = cost_model.estimate("moe", {**problem, "weight_format": "mxfp4"}, experts_default_config(problem),
                             get_target("gfx942"))
    assert mx.bytes_moved < 0.3 * est.bytes_moved
    big = _config(128, 128, 128, 8, 3)
    prefill = _problem(2048, 128, 2048, 768, 8)
    assert big in experts_config_space(prefill)
    assert lds_bytes(big, prefill, is_amd=True) == 2 * (128 * 128 + 2 * 128 * 128) * 2
    for target in ("gfx942", "gfx950"):
        est = cost_model.estimate("moe", prefill, big, get_target(target))
        assert not est.is_feasible and "needs 192 KiB LDS per program" in est.reason, est.reason
    ranked = cost_model.rank("moe", prefill, experts_config_space(prefill), get_target("gfx942"))
    assert ranked[0][1].is_feasible and not ranked[-1][1].is_feasible
