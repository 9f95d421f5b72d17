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
from rdnac.kernels.moe_gemv import TWO_POW_126, _nibble
from rdnac.targets import get_target

INTERPRET = InterpretLauncher()
ROUTE_CONFIG = {"constexprs": {}, "num_warps": 1, "num_stages": 1}
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}  # (atol, rtol)
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
    factors = 8 * 2.0 ** (torch.arange(blocks.shape[0], device=w.device) % 9 - 4).float()
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
@pytest.mark.parametrize("count_in_align", [True, False], ids=["count-in-align", "count-kernel"])
def test_sort_groups_slots_by_expert_in_slot_order(block_m, count_in_align, monkeypatch):
    if not count_in_align:
        monkeypatch.setattr(moe, "COUNT_IN_ALIGN_MAX_SLOTS", 0)
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


def test_experts_float16():
    _check_experts(T=6, E=8, H=96, I=64, k=2, act="gelu", dtype=torch.float16, has_bias=True,
                   config=_config(16, 32, 32))


def test_experts_all_tokens_to_the_same_experts_and_experts_without_tokens():
    # 33 tokens, 4 choices each, all from the same 4 of 16 experts: one expert's rows span several blocks
    # (and the odd sizes mask rows, columns and the K tail); 12 experts get no row at all.
    _check_experts(T=33, E=16, H=80, I=48, k=4, act="gelu_tanh", dtype=torch.float32, has_bias=True,
                   config=_config(16, 32, 32), experts=[3, 9, 10, 15])


def test_experts_prefill_tile_and_one_token(monkeypatch):
    monkeypatch.setattr(moe, "COUNT_IN_ALIGN_MAX_SLOTS", 64)  # 82 slots: the count kernel's path
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


def _gemv(block_m, block_n, block_k, num_warps=4):
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GEMV": True},
            "num_warps": num_warps, "num_stages": 1}


@triton.jit
def _nibble_kernel(words_ptr, scales_ptr, out_ptr, N: tl.constexpr):
    # words [N] int32, scales [N] (one byte per word) -> out [N, 8]: the 8 codes of each word, scaled
    offs = tl.arange(0, N)
    words = tl.load(words_ptr + offs)
    scale = e8m0_to_float(tl.load(scales_ptr + offs).to(tl.int32))
    for j in tl.static_range(8):
        tl.store(out_ptr + offs * 8 + j, _nibble(words, j) * TWO_POW_126 * scale)


def test_gemv_nibble_decoding_is_bit_exact_for_every_code_and_scale():
    """The GEMV's decode (8 codes of an int32 word shifted into float32 bits, then two power-of-two
    products) against the reference codec for every code at every nibble position and every scale byte
    but NaN's 255: the e2m1 subnormal 0.5, the signed zero and the float32 subnormal scale 2**-127."""
    codes = torch.arange(16, dtype=torch.int64)
    # [16] words: every code at every nibble position
    words = torch.stack([(codes.roll(j)[:8] << (4 * torch.arange(8))).sum() for j in range(16)])
    words = words.repeat(255)  # [16 * 255], each word under each scale byte
    scales = torch.arange(255, dtype=torch.uint8).repeat_interleave(16)
    n = triton.next_power_of_2(words.numel())
    as_i32 = torch.zeros(n, dtype=torch.int64)
    as_i32[:words.numel()] = words
    as_i32 = torch.where(as_i32 >= 2 ** 31, as_i32 - 2 ** 32, as_i32).to(torch.int32)
    out = torch.zeros(n * 8, dtype=torch.float32)
    pad = torch.cat([scales, torch.zeros(n - scales.numel(), dtype=torch.uint8)])
    INTERPRET.launch(_nibble_kernel, (1,), (as_i32, pad, out), constexprs=dict(N=n))
    # the reference: the word's 4 bytes (low nibble first) as 8 elements of a block with the word's scale
    packed = as_i32[:words.numel()].view(torch.uint8).reshape(-1, 4)  # little-endian bytes
    blocks = torch.cat([packed, torch.zeros(packed.shape[0], 12, dtype=torch.uint8)], 1)  # [W, 16] = 32 elements
    expected = mxfp4.dequantize(blocks, scales[:, None].contiguous())[:, :8]
    got = out[:words.numel() * 8].reshape(-1, 8)
    assert torch.equal(got, expected) and torch.equal(torch.signbit(got), torch.signbit(expected))


@pytest.mark.parametrize("act,has_bias", [("swiglu_oai", True), ("silu", False)])
def test_experts_mxfp4_gemv_float32(act, has_bias):
    """The decode GEMV (moe_gemv.py) against the reference, with scales spread around 127 and an odd I
    (masked columns and a K tail inside a step)."""
    _check_experts(T=3, E=8, H=96, I=64, k=2, act=act, dtype=torch.float32, has_bias=has_bias,
                   config=_gemv(2, 16, 64), mxfp4_weights=True)
    _check_experts(T=1, E=16, H=64, I=96, k=4, act=act, dtype=torch.float32, has_bias=has_bias,
                   config=_gemv(1, 32, 128), mxfp4_weights=True)


def test_experts_mxfp4_every_decode_candidate_bfloat16():
    """Every MXFP4 decode candidate (GEMV tiles first, then W4A16), several rows per expert at T=9."""
    T, E, H, I, k = 9, 8, 128, 64, 4
    space = experts_config_space(_problem(T, E, H, I, k, weight_format="mxfp4"))
    assert space[0]["constexprs"].get("GEMV") and any("GEMV" not in c["constexprs"] for c in space)
    for config in space:
        if config["constexprs"].get("GEMV"):
            _check_experts(T, E, H, I, k, "swiglu_oai", torch.bfloat16, True, config, mxfp4_weights=True)


def test_experts_mxfp4_dequantized_once_for_prefill():
    """DEQUANT: each projection's experts decoded into one scratch of x's dtype, then the dense GEMM."""
    for dtype in (torch.float32, torch.bfloat16):
        config = {**_config(16, 32, 32), "constexprs": {**_config(16, 32, 32)["constexprs"], "DEQUANT": True}}
        _check_experts(T=11, E=8, H=96, I=64, k=2, act="swiglu_oai", dtype=dtype, has_bias=True, config=config,
                       mxfp4_weights=True)


@pytest.mark.parametrize("config", [_gemv(1, 16, 64), {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32,
                                                                      "DEQUANT": True}, "num_warps": 4,
                                                       "num_stages": 2}], ids=["gemv", "dequant"])
def test_a_wrong_scale_byte_changes_the_output_of_every_mxfp4_path(config):
    T, E, H, I, k = 3, 8, 64, 32, 2
    w13, w2, _, _ = _experts(E, H, I, 0)
    weights, ids = _routing(T, E, k, 0)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    q13, q2 = list(mxfp4.quantize(w13)), list(mxfp4.quantize(w2))
    q13[1] = q13[1].clone()
    q13[1][int(ids[1, 1]), :, 1] += 1
    out = moe.moe_experts_mxfp4(x, weights, ids, *q13, *q2, act="silu", config=config, launcher=INTERPRET)
    expected = ref.moe_experts_mxfp4(x, weights, ids, *q13, *q2, act="silu")
    before = ref.moe_experts_mxfp4(x, weights, ids, *mxfp4.quantize(w13), *q2, act="silu")
    assert (expected - before).abs().max() > 1e-3
    _assert_close(out, expected, torch.float32, f"mxfp4 {config} with one scale raised")


def test_mxfp4_paths_per_phase_and_the_dense_decode_pick_on_sm90():
    """Ranked for sm90 at GPT-OSS-20B's shape: MXFP4 decode takes a GEMV tile, prefill the dequantized
    experts; dense decode takes 16x64x128 with 3 stages, the H100's measured best for both model shapes
    (bench/results/2026-12-07-h100-s16: 80.5 us against the former pick's 113.5 at GPT-OSS-20B batch 1)."""
    sm90 = get_target("sm90")
    for T, flag in ((1, "GEMV"), (16, "GEMV"), (2048, "DEQUANT")):
        problem = _problem(T, 32, 2880, 2880, 4, weight_format="mxfp4", act="swiglu_oai")
        (best, est), *_ = cost_model.rank("moe", problem, experts_config_space(problem), sm90)
        assert best["constexprs"].get(flag), (T, best, est.reason)
    for shape in ((32, 2880, 2880, 4), (128, 2048, 768, 8)):
        for T in (1, 16, 64):
            problem = _problem(T, shape[0], shape[1], shape[2], shape[3])
            (best, _), *_ = cost_model.rank("moe", problem, experts_config_space(problem), sm90)
            assert best == _config(16, 64, 128, 4, 3), (shape, T, best)


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
        ("_moe_route_kernel", (T,)), ("_moe_align_kernel", (E,)),  # few slots: the align kernel counts
        ("_moe_gemm_kernel", (blocks, I // 64)), ("_moe_gemm_kernel", (blocks, H // 64)), ("_moe_sum_kernel", (T, 1))]
    assert rec.launches[1][2]["COUNT"]
    rec = _Recorder()
    T = 200  # 800 slots: the count kernel first
    weights, ids = meta(T, k, dtype=torch.float32), meta(T, k, dtype=torch.int32)
    moe.moe_experts(meta(T, H), weights, ids, meta(E, 2 * I, H), meta(E, H, I), act="silu", config=config, launcher=rec)
    assert [name for name, _, _ in rec.launches][:2] == ["_moe_count_kernel", "_moe_align_kernel"]
    assert not rec.launches[1][2]["COUNT"]


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
    assert lds_bytes(big, prefill, "gfx942") == 2 * (128 * 128 + 2 * 128 * 128) * 2
    assert lds_bytes(big, prefill, "gfx950") == lds_bytes(big, prefill, "sm90") == 3 * (128 * 128 + 2 * 128 * 128) * 2
    for target, kib in (("gfx942", 192), ("gfx950", 288)):
        est = cost_model.estimate("moe", prefill, big, get_target(target))
        assert not est.is_feasible and f"needs {kib} KiB LDS per program" in est.reason, est.reason
    ranked = cost_model.rank("moe", prefill, experts_config_space(prefill), get_target("gfx942"))
    assert ranked[0][1].is_feasible and not ranked[-1][1].is_feasible


# ---------------------------------------------------------------- cross-compiles


def _record(T, E, H, I, k, weight_format, config, pdl=False):
    """The launches of a routing and an expert MLP step of T tokens, over meta tensors."""
    from rdnac.compiler.record import RecordingLauncher

    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    u8 = torch.uint8
    rec = RecordingLauncher(pdl=pdl)
    weights, ids = moe_route.moe_route(meta(T, E), top_k=k, scoring="topk_softmax", config=ROUTE_CONFIG, launcher=rec)
    if weight_format == "mxfp4":
        moe.moe_experts_mxfp4(meta(T, H), weights, ids, meta(E, 2 * I, H // 2, dtype=u8),
                              meta(E, 2 * I, H // 32, dtype=u8), meta(E, H, I // 2, dtype=u8),
                              meta(E, H, I // 32, dtype=u8), meta(E, 2 * I), meta(E, H), act="swiglu_oai",
                              config=config, launcher=rec)
    else:
        moe.moe_experts(meta(T, H), weights, ids, meta(E, 2 * I, H), meta(E, H, I), act="silu", config=config,
                        launcher=rec)
    return rec.calls


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_family_cross_compiles_for_target(target):
    """Every kernel of the family at a decode and a prefill size, dense and MXFP4, builds for the target,
    fits it and spills nothing; the grouped GEMMs use its matrix instructions (MXFP4 as W4A16: bf16 ones).
    sm90 plans launch with programmatic dependent launch: every kernel of the family has its PDL form."""
    from rdnac.compiler.build import check_resources, compile_calls

    E, H, I, k = 16, 512, 256, 4
    calls = []
    pdl = get_target(target).has_pdl
    for T in (1, 512):
        problem = _problem(T, E, H, I, k)
        for fmt in ("dense", "mxfp4"):  # MXFP4's defaults: the GEMV at decode, DEQUANT + dense GEMM at prefill
            calls += _record(T, E, H, I, k, fmt, experts_default_config({**problem, "weight_format": fmt}), pdl=pdl)
    calls += _record(1, E, H, I, k, "mxfp4", _config(16, 64, 64), pdl=pdl)  # the W4A16 GEMM (the former default)
    assert all(c.constexprs["PDL"] == pdl for c in calls)
    binaries = compile_calls(calls, target, quiet=True)
    assert {b.kernel.split(":")[1] for b in binaries} == {
        "_moe_route_kernel", "_moe_count_kernel", "_moe_align_kernel", "_moe_gemm_kernel", "_moe_sum_kernel",
        "_moe_gemv_mxfp4_kernel", "_mxfp4_dequant_kernel"}
    assert any(b.call.constexprs.get("MXFP4") for b in binaries)
    for b in binaries:
        assert check_resources(b, target) == [], b.key
        if b.kernel.endswith("_moe_gemm_kernel"):
            assert b.resources.matrix_instructions, f"{target}: {b.key} uses no matrix instruction"
            assert all("bf16" in m for m in b.resources.matrix_instructions), b.resources.matrix_instructions


def test_a_tile_over_gfx942_lds_is_rejected_with_its_size():
    """The widest prefill tile needs 192 KiB of LDS: the cost model says so before compiling, and the
    compiled binary's shared memory says so too (what kernel selection logs when a pick does not fit)."""
    from rdnac.compiler.build import check_resources, compile_calls

    big = _config(128, 128, 128, 8, 3)
    problem = _problem(2048, 16, 512, 256, 4)
    est = cost_model.estimate("moe", problem, big, get_target("gfx942"))
    assert "does not fit: needs 192 KiB LDS per program (196608 bytes), gfx942 has 64 KiB" in est.reason
    gated = [c for c in _record(512, 16, 512, 256, 4, "dense", big) if c.constexprs.get("GATED")]
    (binary,) = compile_calls(gated, "gfx942", quiet=True)
    assert binary.resources.shared_bytes == 196608
    assert any("needs 196608 bytes of LDS/shared memory; gfx942 allows 65536 per block" in p
               for p in check_resources(binary, "gfx942"))


def _moe_graph(weight_format: str, E=16, H=256, I=128, k=4):
    from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec

    weights = {"router": WeightSpec("bfloat16", (E, H))}
    if weight_format == "mxfp4":
        for name, (n, kk) in (("w13", (2 * I, H)), ("w2", (H, I))):
            weights[f"{name}_blocks"] = WeightSpec("uint8", (E, n, kk // 2), "mxfp4")
            weights[f"{name}_scales"] = WeightSpec("uint8", (E, n, kk // 32), "mxfp4")
        experts = Node("experts", "moe_experts_mxfp4", ["x", "rw", "ids", "w13_blocks", "w13_scales", "w2_blocks",
                                                        "w2_scales", "b13", "b2"], ["y"],
                       {"act": "swiglu_oai", "alpha": 1.702, "limit": 7.0})
        weights.update(b13=WeightSpec("bfloat16", (E, 2 * I)), b2=WeightSpec("bfloat16", (E, H)))
        route = {"top_k": k, "scoring": "topk_softmax"}
    else:
        weights.update(w13=WeightSpec("bfloat16", (E, 2 * I, H)), w2=WeightSpec("bfloat16", (E, H, I)))
        experts = Node("experts", "moe_experts", ["x", "rw", "ids", "w13", "w2"], ["y"], {"act": "silu"})
        route = {"top_k": k, "scoring": "softmax_topk", "renormalize": True}
    nodes = [Node("router", "linear", ["x", "router"], ["logits"]),
             Node("route", "moe_route", ["logits"], ["rw", "ids"], route), experts]
    return Graph(inputs={"x": TensorSpec("bfloat16", ("T", H))}, weights=weights, nodes=nodes, outputs=["y"])


@pytest.mark.parametrize("target,weight_format", [("gfx942", "dense"), ("gfx950", "mxfp4")])
def test_kernel_selection_of_a_moe_graph(target, weight_format):
    """A hand-built MoE graph (router, routing, experts) through select_kernels: every step key gets the
    family's wrappers, every binary fits, tiles the cost model finds over the target's LDS are logged as
    rejected with their size, and the chosen ones say how many experts' bytes a step reads."""
    from rdnac.compiler.build import check_resources
    from rdnac.compiler.passes import CompileState, select_kernels
    from rdnac.compiler.pipeline import CompileOptions
    from rdnac.ir.verify import verify

    graph = _moe_graph(weight_format)
    verify(graph)
    state = CompileState(graph, {}, target, options=CompileOptions(target=target, max_num_seqs=2,
                                                                    max_num_batched_tokens=512, quiet=True))
    state.runtime = {"kv_block_size": 16, "max_model_len": 64, "pdl": False, "early_meta": False}
    select_kernels.run(state)
    assert state.program["experts"]["decode:1"]["kernel"] == f"moe.{graph.node('experts').op}"
    assert state.program["route"]["prefill:512"]["kernel"] == "moe_route.moe_route"
    assert all(check_resources(b, target) == [] for b in state.binaries)
    log = [d for d in state.decisions if d["node"] == "experts"]
    rejected = [d for d in log if d["action"].startswith("rejected")]
    chosen = [d for d in log if not d["action"].startswith("rejected")]
    assert any("needs 192 KiB LDS" in d["reason"] or "bytes of LDS" in d["reason"] for d in rejected), rejected
    assert all("experts active" in d["reason"] for d in chosen), chosen
    decode = next(d for d in chosen if "decode T<=1" in d["action"])
    assert "4.0 of 16 experts active" in decode["reason"]
    is_gemv = "GEMV=True" in decode["action"]  # at these tiny sizes launches dominate: either MXFP4 decode path
    if weight_format == "mxfp4":  # each pick names its path; the experts dequantized once where that pays
        assert ("MXFP4 GEMV" if is_gemv else "W4A16") in decode["reason"], decode
        assert any("GEMV=True" in d["action"] and "MXFP4 GEMV" in d["reason"] for d in chosen), chosen
        dequant = [d for d in chosen if "DEQUANT=True" in d["action"]]  # above decode sizes, where it pays
        assert dequant and all("MXFP4 dequantized once per step" in d["reason"] for d in dequant), chosen
    # what `rdnac inspect` shows per MoE node: tile, the GEMMs' resources, bytes per token at batch 1
    from rich.console import Console

    from rdnac.cli.inspect_moe import moe_summary, render_moe

    (entry,) = moe_summary(state.graph, state.program, [b.to_dict() for b in state.binaries])
    per_expert = 3 * 128 * 256 * (2 if weight_format == "dense" else 0.5) + (
        0 if weight_format == "dense" else 3 * 128 * 256 // 32 + (2 * 128 + 256) * 2)  # scales, biases
    assert (entry["num_experts"], entry["top_k"], entry["active_expert_bytes"]) == (16, 4, 4 * per_expert)
    assert entry["decode"]["config"] == state.program["experts"]["decode:1"]["config"]
    assert set(entry["decode"]["gemms"]) == {"gate_up", "down"}
    assert entry["decode"]["config"]["constexprs"].get("GEMV", False) == is_gemv
    assert all(bool(g["matrix_instructions"]) != is_gemv and g["shared_bytes"] <= get_target(target).lds_bytes
               for g in entry["decode"]["gemms"].values())
    console = Console(record=True, width=200)
    render_moe(console, [entry])
    text = console.export_text()
    block_m = entry["decode"]["config"]["constexprs"]["BLOCK_M"]
    assert "4 of 16" in text and "MB" in text and f"BLOCK_M={block_m}" in text
    assert block_m <= 8 if is_gemv else block_m == 16


@triton.jit
def _dot_scaled_probe(a_ptr, b_ptr, s_ptr, o_ptr, A_FORMAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):
    # a [BM, BK] (A_FORMAT), b [BK/2, BN] e2m1 pairs, s [BN, BK/32] e8m0 -> o [BM, BN] f32
    om, on, ok = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + om[:, None] * BK + ok[None, :])
    b = tl.load(b_ptr + tl.arange(0, BK // 2)[:, None] * BN + on[None, :])
    s = tl.load(s_ptr + on[:, None] * (BK // 32) + tl.arange(0, BK // 32)[None, :])
    tl.store(o_ptr + om[:, None] * BN + on[None, :], tl.dot_scaled(a, None, A_FORMAT, b, s, "e2m1"))


@pytest.mark.parametrize("target", ["gfx950", "sm90"])
def test_what_triton_emits_for_dot_scaled(target):
    """Why MXFP4 runs as W4A16 everywhere (the decision log's note): Triton 3.9 gives gfx950's scaled MFMA
    only when the activations are fp8 (or fp4) too; bf16 activations against e2m1 weights, what the
    reference computes, lower to bf16 matrix instructions on gfx950 and sm90 alike, as the decode-in-loop
    kernel does. If this starts failing, Triton has a native bf16 x e2m1 path worth taking."""
    from triton.compiler import ASTSource

    from rdnac.targets.compile import COMPILE_OPTIONS, matrix_instructions

    def emitted(a_format, a_type):
        signature = {"a_ptr": a_type, "b_ptr": "*u8", "s_ptr": "*u8", "o_ptr": "*fp32", "A_FORMAT": "constexpr",
                     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
        src = ASTSource(fn=_dot_scaled_probe, signature=signature,
                        constexprs={"A_FORMAT": a_format, "BM": 32, "BN": 64, "BK": 128})
        compiled = triton.compile(src, target=get_target(target).gpu_target(),
                                  options={"num_warps": 4, **COMPILE_OPTIONS})
        return matrix_instructions(compiled.asm.get("amdgcn") or compiled.asm["ptx"])

    bf16 = emitted("bf16", "*bf16")
    assert bf16 and all("bf16" in m for m in bf16), bf16
    if target == "gfx950":
        assert any("v_mfma_scale" in m and "f8f6f4" in m for m in emitted("e4m3", "*fp8e4nv"))


# ---------------------------------------------------------------- GPU


def _sm90_fits(problem):
    return [c for c in experts_config_space(problem)
            if cost_model.estimate("moe", problem, c, get_target("sm90")).is_feasible]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
@pytest.mark.parametrize("mxfp4_weights", [False, True], ids=["bf16", "mxfp4"])
def test_moe_gpu_decode_and_prefill_sizes(mxfp4_weights):
    """Every config that fits sm90, at decode and prefill token counts, against the reference on the GPU."""
    launcher = JitLauncher()
    E, H, I, k = 32, 512, 256, 4
    act = "swiglu_oai" if mxfp4_weights else "silu"
    for T in (1, 3, 16, 64, 300, 2048):
        fmt = "mxfp4" if mxfp4_weights else "dense"
        for config in _sm90_fits(_problem(T, E, H, I, k, weight_format=fmt)):
            _check_experts(T, E, H, I, k, act, torch.bfloat16, True, config, seed=T, mxfp4_weights=mxfp4_weights,
                           launcher=launcher, device="cuda")
    logits = torch.randn(2048, 128, device="cuda")
    for scoring, renormalize in (("softmax_topk", True), ("topk_softmax", False)):
        weights, ids = moe_route.moe_route(logits, top_k=8, scoring=scoring, renormalize=renormalize,
                                           config=ROUTE_CONFIG, launcher=launcher)
        ref_weights, ref_ids = ref.moe_route(logits, top_k=8, scoring=scoring, renormalize=renormalize)
        assert torch.equal(ids, ref_ids)
        _assert_close(weights, ref_weights, torch.float32, scoring, (1e-6, 1e-6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
@pytest.mark.parametrize("mxfp4_weights", [False, True], ids=["bf16", "mxfp4"])
def test_moe_gpu_decode_step_replays_in_a_graph_bit_for_bit(mxfp4_weights):
    """Routing and experts of a decode step captured once per batch bucket: replays with new router logits
    and hidden states give the eager result bit for bit (no host sync, grids from shapes only)."""
    launcher = JitLauncher()
    E, H, I, k = 32, 512, 256, 4
    w13, w2, b13, b2 = _experts(E, H, I, 0, "cuda")
    if mxfp4_weights:
        experts = [*mxfp4.quantize(w13), *mxfp4.quantize(w2)]
        run_experts = moe.moe_experts_mxfp4
    else:
        experts = [w13.to(torch.bfloat16), w2.to(torch.bfloat16)]
        run_experts = moe.moe_experts
    biases = [b13.to(torch.bfloat16), b2.to(torch.bfloat16)]
    for T in (1, 2, 4, 8, 16, 32, 64):
        config = experts_default_config(_problem(T, E, H, I, k, weight_format="mxfp4" if mxfp4_weights else "dense"))
        x = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(T, E, device="cuda")

        def step():
            weights, ids = moe_route.moe_route(logits, top_k=k, scoring="topk_softmax", config=ROUTE_CONFIG,
                                               launcher=launcher)
            return run_experts(x, weights, ids, *experts, *biases, act="swiglu_oai", config=config,
                               launcher=launcher)

        x.normal_(), logits.normal_()
        step()  # compile before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(5):
            x.normal_(), logits.normal_()
            expected = step()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected), f"T={T}: replay differs from eager"
            weights, ids = ref.moe_route(logits, top_k=k, scoring="topk_softmax")
            if mxfp4_weights:
                dense = [mxfp4.dequantize(*experts[:2]), mxfp4.dequantize(*experts[2:])]
            else:
                dense = [w.float() for w in experts]
            reference = ref.moe_experts(x.float(), weights, ids, *dense, *biases, act="swiglu_oai")
            _assert_close(out, reference.to(torch.bfloat16), torch.bfloat16, f"graph T={T}")


# ---------------------------------------------------------------- --quantize mxfp4


def test_quantize_mxfp4_rewrites_the_experts_bit_exactly():
    """`--quantize mxfp4`: moe_experts becomes moe_experts_mxfp4 over blocks and scales that are
    `mxfp4.quantize` of each expert, bit for bit; the router keeps its dtype; the rewritten graph
    computes what the dense graph computes with the dequantized weights, exactly."""
    import copy

    from rdnac.compiler.passes import CompileState, quantize_mxfp4
    from rdnac.compiler.pipeline import CompileOptions
    from rdnac.ir import interpreter
    from rdnac.ir.verify import verify

    E, H, I, k = 8, 64, 32, 2
    graph = _moe_graph("dense", E=E, H=H, I=I, k=k)
    g = torch.Generator().manual_seed(0)
    weights = {name: (torch.randn(*spec.shape, generator=g) * 0.1).to(torch.bfloat16)
               for name, spec in graph.weights.items()}
    dense_graph, dense_weights = copy.deepcopy(graph), dict(weights)
    state = CompileState(graph, weights, "cpu", options=CompileOptions(target="cpu", quantize="mxfp4"))
    quantize_mxfp4.run(state)
    verify(state.graph)
    node = state.graph.node("experts")
    assert node.op == "moe_experts_mxfp4"
    assert node.inputs == ["x", "rw", "ids", "w13_blocks", "w13_scales", "w2_blocks", "w2_scales"]
    assert state.weights["router"] is dense_weights["router"] and "w13" not in state.weights
    for name in ("w13", "w2"):
        blocks, scales = state.weights[f"{name}_blocks"], state.weights[f"{name}_scales"]
        assert state.graph.weights[f"{name}_blocks"].dtype == "uint8" and blocks.dtype == scales.dtype == torch.uint8
        for e in range(E):
            want = mxfp4.quantize(dense_weights[name][e])
            assert torch.equal(blocks[e], want[0]) and torch.equal(scales[e], want[1])
        dense_weights[name] = torch.stack([mxfp4.dequantize(blocks[e], scales[e]) for e in range(E)]).to(torch.bfloat16)
    assert any("relative error" in d["reason"] for d in state.decisions if d["node"] == "experts")
    x = {"x": torch.randn(5, H, generator=g).to(torch.bfloat16)}
    quantized = interpreter.run(state.graph, state.weights, dict(x))["y"]
    assert torch.equal(quantized, interpreter.run(dense_graph, dense_weights, dict(x))["y"])


def test_decode_bytes_count_only_the_routed_experts():
    """The benchmarks' bytes read per decode step: at batch 1 a MoE layer reads its k experts (weights,
    scales and biases), not all E; at a large batch, all of them."""
    from types import SimpleNamespace

    from rdnac.bench.decode import decode_bytes

    for fmt in ("dense", "mxfp4"):
        graph = _moe_graph(fmt, E=16, H=256, I=128, k=4)
        weights = {name: torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
                   for name, spec in graph.weights.items()}
        experts = sum(t.numel() * t.element_size() for name, t in weights.items() if name != "router")
        router = weights["router"].numel() * 2
        llm = SimpleNamespace(graph=graph, weights=weights)
        assert decode_bytes(llm, batch=1, context=0) == router + experts * 4 // 16
        assert decode_bytes(llm, batch=4096, context=0) == router + experts


# ---------------------------------------------------------------- FP8 block experts (DeepSeek's 128x128 scales)


def _fp8_blocks(w: torch.Tensor, fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] float -> (FP8 bits [E, N, K], float32 scales [E, cdiv(N, 128), cdiv(K, 128)]): amax / FP8_MAX
    per 128x128 block times a seeded factor in [1, 4), so a scale read from the wrong block shows."""
    from rdnac.ir.fp8 import FORMATS, FP8_MAX

    E, N, K = w.shape
    nb, kb = -(-N // 128), -(-K // 128)
    blocks = torch.nn.functional.pad(w, (0, kb * 128 - K, 0, nb * 128 - N)).reshape(E, nb, 128, kb, 128)
    factor = 1 + 3 * torch.rand(E, nb, kb, generator=torch.Generator().manual_seed(seed))
    scale = blocks.abs().amax((2, 4)) / FP8_MAX[fmt] * factor
    q = (blocks / scale[:, :, None, :, None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt])
    return q.reshape(E, nb * 128, kb * 128)[:, :N, :K].to(FORMATS[fmt]).contiguous(), scale.float().contiguous()


def _fp8_block_experts(E, H, I, fmt, seed):
    """(w13 bits, w13 scales: the gate's blocks then the up's, w2 bits, w2 scales), as the frontend stacks them."""
    w13, w2, _, _ = _experts(E, H, I, seed)
    (gate, gate_s), (up, up_s) = _fp8_blocks(w13[:, :I], fmt, seed), _fp8_blocks(w13[:, I:], fmt, seed + 1)
    return (torch.cat([gate, up], 1), torch.cat([gate_s, up_s], 1), *_fp8_blocks(w2, fmt, seed + 2))


def _check_fp8_block(T, E, H, I, k, dtype, config, *, fmt="e4m3fn", act_scheme="dynamic_group", experts=None,
                     seed=0, weights=None):
    w13, s13, w2, s2 = weights or _fp8_block_experts(E, H, I, fmt, seed)
    rw, ids = _routing(T, E, k, seed, experts)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    attrs = dict(act="silu", fp8_format=fmt, act_scheme=act_scheme, block_size=[128, 128])
    out = moe.moe_experts_fp8_block(x, rw, ids, w13, s13, w2, s2, **attrs, config=config, launcher=INTERPRET)
    expected = ref.moe_experts_fp8_block(x, rw, ids, w13, s13, w2, s2, **attrs)
    _assert_close(out, expected, dtype, f"moe_experts_fp8_block T={T} E={E} H={H} I={I} k={k} {fmt} {act_scheme} "
                  f"{dtype} {config}")
    return out


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("act_scheme", ["dynamic_group", "none"])
def test_experts_fp8_block_float32(fmt, act_scheme):
    """H 200 and I 144: two scale blocks along each, the second partial, and the up rows' blocks after the
    gate's two; float32 activations quantize to the reference's bits, so only summation order differs."""
    _check_fp8_block(T=7, E=8, H=200, I=144, k=2, dtype=torch.float32, config=_config(16, 32, 64), fmt=fmt,
                     act_scheme=act_scheme)


def test_experts_fp8_block_bfloat16_prefill_tile_and_one_token():
    _check_fp8_block(T=37, E=8, H=160, I=96, k=3, dtype=torch.bfloat16, config=_config(64, 64, 128, 8),
                     experts=[1, 4, 6])
    _check_fp8_block(T=1, E=16, H=160, I=96, k=4, dtype=torch.bfloat16, config=_config(16, 64, 32))


def test_experts_fp8_block_every_decode_candidate():
    T, E, H, I, k = 3, 8, 160, 96, 2
    weights = _fp8_block_experts(E, H, I, "e4m3fn", 0)
    problem = {**_problem(T, E, H, I, k, weight_format="fp8_block"), "act_scheme": "dynamic_group"}
    for config in experts_config_space(problem):
        _check_fp8_block(T, E, H, I, k, torch.float32, config, weights=weights)


def test_a_wrong_fp8_block_scale_changes_the_output():
    """Each scale block is read where it belongs: doubling one of expert 3's up-projection blocks (the
    second gate/up block row of its w13 scales) moves exactly the tokens routed to expert 3."""
    T, E, H, I, k = 6, 4, 160, 144, 1
    w13, s13, w2, s2 = _fp8_block_experts(E, H, I, "e4m3fn", 5)
    attrs = dict(act="silu", fp8_format="e4m3fn", act_scheme="dynamic_group", block_size=[128, 128])
    rw, ids = _routing(T, E, k, 5)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(6))
    edited = s13.clone()
    edited[3, 2, 1] *= 2  # expert 3, the up rows' first block row, H columns 128..199
    outs = []
    for scales in (s13, edited):
        outs.append(moe.moe_experts_fp8_block(x, rw, ids, w13, scales, w2, s2, **attrs, config=_config(16, 32, 64),
                                              launcher=INTERPRET))
        _assert_close(outs[-1], ref.moe_experts_fp8_block(x, rw, ids, w13, scales, w2, s2, **attrs), torch.float32,
                      "moe_experts_fp8_block with an edited scale")
    moved = (outs[0] - outs[1]).abs().amax(-1) > 1e-3
    assert moved.tolist() == (ids[:, 0] == 3).tolist() and moved.any(), (moved, ids)


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_fp8_block_experts_cross_compile_for_target(target):
    """The FP8 block grouped GEMM at DeepSeek-V3's expert shape (H 7168, I 2048, 256 experts, top 8) with
    the default decode and prefill tiles builds, fits and spills nothing; FP8 matrix instructions where the
    target has an FP8 dot (e4m3fnuz on gfx942), bf16 ones on gfx1151 (a16w8)."""
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.record import RecordingLauncher
    from rdnac.ir.fp8 import FORMATS

    t = get_target(target)
    fmt = t.fp8_format or "e4m3fn"
    act_scheme = "dynamic_group" if t.fp8_format else "none"
    E, H, I, k = 256, 7168, 2048, 8
    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    rec = RecordingLauncher(pdl=t.has_pdl)
    for T in (1, 64, 512):
        problem = {**_problem(T, E, H, I, k, weight_format="fp8_block"), "act_scheme": act_scheme}
        moe.moe_experts_fp8_block(meta(T, H), meta(T, k, dtype=torch.float32), meta(T, k, dtype=torch.int32),
                                  meta(E, 2 * I, H, dtype=FORMATS[fmt]), meta(E, 2 * I // 128, H // 128,
                                                                              dtype=torch.float32),
                                  meta(E, H, I, dtype=FORMATS[fmt]), meta(E, H // 128, I // 128, dtype=torch.float32),
                                  act="silu", fp8_format=fmt, act_scheme=act_scheme, block_size=[128, 128],
                                  config=experts_default_config(problem), launcher=rec)
    binaries = compile_calls([c for c in rec.calls if c.kernel.endswith("_moe_fp8_block_gemm_kernel")], target,
                             quiet=True)
    assert len(binaries) >= 4
    for b in binaries:
        assert check_resources(b, target) == [], b.key
        instructions = b.resources.matrix_instructions
        assert instructions and all(("bf16" in m) == (act_scheme == "none") for m in instructions), (b.key,
                                                                                                     instructions)
        print(f"\n{target} {b.call.constexprs['BLOCK_M']}x{b.call.constexprs['BLOCK_N']}x"
              f"{b.call.constexprs['BLOCK_K']} GATED={b.call.constexprs['GATED']}: {b.resources.shared_bytes} B LDS, "
              f"{b.resources.num_regs} registers, {instructions}")


# ---------------------------------------------------------------- expert parallelism: a rank's local experts


def _poisoned_empty(monkeypatch):
    """torch.empty filled with NaN (floats) or -7 (ints): a row the kernels never write, summed anyway,
    shows (the allocator would often hand back zeros and hide it)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.device.type != "meta":
            t.fill_(float("nan") if t.is_floating_point() else -7)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


def _rank_ids(ids, rank, local):
    from rdnac.ir import collectives

    return collectives.shard_ids(ids, torch.tensor([rank * local]), size=local)


@pytest.mark.parametrize("count_in_align", [True, False], ids=["count-in-align", "count-kernel"])
def test_sort_drops_ids_outside_the_local_experts(count_in_align, monkeypatch):
    """--ep: ids of other ranks' experts (-1 from shard_ids; any id outside [0, E)) land in no block."""
    if not count_in_align:
        monkeypatch.setattr(moe, "COUNT_IN_ALIGN_MAX_SLOTS", 0)
    T, E, k, block_m = 9, 4, 3, 16
    _, ids = _routing(T, 12, k, seed=3)
    local = _rank_ids(ids, 1, E)  # experts 4..7 of 12
    local[0, 0] = E  # out of range the other way: dropped too
    assert (local == -1).any() and (local >= 0).any()
    sorted_slots, block_expert, num_padded = moe.sort_slots(local, E, block_m, INTERPRET)
    flat, start = local.flatten(), 0
    for e in range(E):
        mine = torch.nonzero(flat == e).flatten().to(torch.int32)
        padded = -(-len(mine) // block_m) * block_m
        assert torch.equal(sorted_slots[start:start + len(mine)], mine), f"expert {e}"
        assert (sorted_slots[start + len(mine):start + padded] == T * k).all(), f"expert {e}: padding"
        assert (block_expert[start // block_m:(start + padded) // block_m] == e).all()
        start += padded
    assert num_padded.tolist() == [start]
    dropped = torch.nonzero((flat < 0) | (flat >= E)).flatten()
    assert not torch.isin(sorted_slots[:start], dropped.to(torch.int32)).any()


_EP_PATHS = {"dense-f32": (torch.float32, False, _config(16, 32, 32)),
             "dense-bf16": (torch.bfloat16, False, _config(16, 64, 64)),
             "mxfp4-w4a16": (torch.float32, True, _config(16, 32, 64)),
             "mxfp4-gemv": (torch.float32, True, _gemv(2, 16, 64)),
             "mxfp4-dequant": (torch.float32, True, {**_config(16, 32, 32), "constexprs": {
                 **_config(16, 32, 32)["constexprs"], "DEQUANT": True}})}


@pytest.mark.parametrize("path", list(_EP_PATHS))
def test_experts_of_one_rank_with_an_expert_offset(path, monkeypatch):
    """16 experts over 4 ranks (4 local each, tp.expert_start = 4r): each rank's kernel output on its local
    experts and its shard_ids ids matches the reference on the same (skipping -1), a token all of whose
    experts are elsewhere gets an exact zero row, and the four partial outputs sum (the all_reduce) to the
    single-rank reference; unwritten buffers are NaN, so a dropped slot's row must not be read."""
    dtype, is_mxfp4, config = _EP_PATHS[path]
    ranks, E, T, H, I, k = 4, 16, 7, 96, 64, 3
    w13, w2, b13, b2 = _experts(E, H, I, 0)
    weights, ids = _routing(T, E, k, 0)
    ids[0] = torch.tensor([0, 2, 3], dtype=torch.int32)  # token 0: rank 0's experts only
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    attrs = dict(act="swiglu_oai", alpha=1.702, limit=7.0)
    if is_mxfp4:
        q13, q2 = mxfp4.quantize(_spread(w13)), mxfp4.quantize(_spread(w2))
        full = ref.moe_experts_mxfp4(x.float(), weights, ids, *q13, *q2, b13, b2, **attrs)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
        full = ref.moe_experts(x.float(), weights, ids, w13.float(), w2.float(), b13, b2, **attrs)
    local, total = E // ranks, torch.zeros(T, H)
    for r in range(ranks):
        mine = slice(r * local, (r + 1) * local)
        rank_ids = _rank_ids(ids, r, local)
        if is_mxfp4:
            rank_weights = [t[mine].contiguous() for t in (*q13, *q2, b13, b2)]
            expected = ref.moe_experts_mxfp4(x.float(), weights, rank_ids, *rank_weights, **attrs)
            with monkeypatch.context() as m:
                _poisoned_empty(m)
                out = moe.moe_experts_mxfp4(x, weights, rank_ids, *rank_weights, **attrs, config=config,
                                            launcher=INTERPRET)
        else:
            rank_weights = [t[mine].contiguous() for t in (w13, w2, b13, b2)]
            expected = ref.moe_experts(x.float(), weights, rank_ids, *(t.float() for t in rank_weights), **attrs)
            with monkeypatch.context() as m:
                _poisoned_empty(m)
                out = moe.moe_experts(x, weights, rank_ids, *rank_weights, **attrs, config=config, launcher=INTERPRET)
        _assert_close(out, expected.to(dtype), dtype, f"{path} rank {r}")
        if r > 0:
            assert torch.equal(out[0], torch.zeros_like(out[0])), f"{path} rank {r}: token 0 has no local expert"
        total += out.float()
    _assert_close(total.to(dtype), full.to(dtype), dtype, f"{path}: the ranks' sum against one rank",
                  (2e-4, 1e-4) if dtype == torch.float32 else None)


def test_fp8_block_experts_of_one_rank_with_an_expert_offset(monkeypatch):
    """The FP8 block experts' path through the same sort and sum: rank 1 of 2 (experts 4..7 of 8)."""
    T, E, H, I, k = 7, 8, 160, 96, 2
    w13, s13, w2, s2 = _fp8_block_experts(E, H, I, "e4m3fn", 0)
    rw, ids = _routing(T, E, k, 0)
    rank_ids = _rank_ids(ids, 1, E // 2)
    assert (rank_ids == -1).any() and (rank_ids >= 0).any()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    mine = [t[E // 2:].contiguous() for t in (w13, s13, w2, s2)]
    attrs = dict(act="silu", fp8_format="e4m3fn", act_scheme="dynamic_group", block_size=[128, 128])
    expected = ref.moe_experts_fp8_block(x, rw, rank_ids, *mine, **attrs)
    with monkeypatch.context() as m:
        _poisoned_empty(m)
        out = moe.moe_experts_fp8_block(x, rw, rank_ids, *mine, **attrs, config=_config(16, 32, 64),
                                        launcher=INTERPRET)
    _assert_close(out, expected, torch.float32, "moe_experts_fp8_block rank 1 of 2")
