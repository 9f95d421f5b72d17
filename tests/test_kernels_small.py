"""The small kernel families against their IR references (rdnac.ir.ops).

embedding, rms_norm / head_rms_norm, rope, kv_cache_write, gated_act,
argmax. CPU tests run the kernels under the Triton interpreter
in float32 and bfloat16; the `gpu` tests run the same checks JIT-compiled on
CUDA in bfloat16. Each `_check_*` asserts shape, then dtype, then closeness.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from rdnac.ir import ops, rope_math
from rdnac.kernels import activation, embedding, kv_cache, rms_norm, rope, sampling
from rdnac.compiler.record import record_call
from rdnac.kernels.launch import InterpretLauncher, JitLauncher
from rdnac.plans.binaries import KernelCall

has_cuda = torch.cuda.is_available()


# ------------------------------------------------------------ interpreter shims
# A Triton 3.9 interpreter gap, worked around here until
# rdnac.kernels.launch.InterpretLauncher handles it (`rdnac run --interpret`
# needs it too); harmless once it does: float32 -> bfloat16 casts truncate
# where GPUs round to nearest even, so bf16 results came out 1 ulp off the
# reference.


def _rne_cast_impl(cast_impl):
    def rne_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = data.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(data), ((bits >> 16) | 0x40).astype(np.uint16), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return cast_impl(self, src, dst_type)
    return rne_cast_impl


@contextlib.contextmanager
def _patched(obj, name: str, make):
    """Replace obj.name by make(original) for the duration of one launch, so no other test sees it."""
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


class _Launcher(InterpretLauncher):
    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        with _patched(interpreter.InterpreterBuilder, "cast_impl", _rne_cast_impl):
            super().launch(kernel, grid, args, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages)


CPU = _Launcher()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol, equal_nan=True), \
        f"{name}: max abs error {err:.3g} (atol {atol}, rtol {rtol})"


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    # rounding is mirrored step by step, so the interpreter is usually bit-exact; the
    # slack covers rsqrt/exp/cos implementations that differ by an ulp before a bf16 rounding
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)


def _pick(configs: list[dict], default: dict, count: int) -> list[dict]:
    """The default plus `count` configs spread over the space."""
    step = max(1, len(configs) // count)
    chosen = [default] + configs[::step][:count]
    unique = []
    for c in chosen:
        if c not in unique:
            unique.append(c)
    return unique


# ------------------------------------------------------------ embedding


def _check_embedding(launcher, device, dtype, config, vocab=49152, hidden=576):
    weight = torch.randn(vocab, hidden, dtype=dtype, device=device)
    ids = torch.tensor([0, vocab - 1, 5, 5, 1234, 40000 % vocab, 77], device=device)
    for scale in (1.0, hidden ** 0.5):
        out = embedding.embedding(ids, weight, scale=scale, config=config, launcher=launcher)
        assert_close(f"embedding scale={scale}", out, ops.embedding(ids, weight, scale=scale), *_tol(dtype))
    # -1: another rank's row of a vocabulary-parallel table (collectives.shard_ids): a zero row
    ids = torch.tensor([-1, 3, -1, vocab - 1], device=device)
    out = embedding.embedding(ids, weight, scale=2.0, config=config, launcher=launcher)
    assert not out[[0, 2]].any()
    assert_close("embedding of -1 ids", out, ops.embedding(ids, weight, scale=2.0), *_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding(dtype):
    problem = {"H": 576, "dtype": str(dtype)}
    for config in _pick(embedding.config_space(problem), embedding.default_config(problem), 4):
        _check_embedding(CPU, "cpu", dtype, config, vocab=4096)
    _check_embedding(CPU, "cpu", dtype, embedding.default_config(problem))  # vocab 49152, int64 offsets


# ------------------------------------------------------------ rms_norm


def _check_rms_norm(launcher, device, dtype, config, hidden=576, num_tokens=7):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device) * 3
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device) * 0.1 + 1
    for unit_offset in (False, True):
        kw = dict(eps=1e-6, unit_offset=unit_offset)
        out = rms_norm.rms_norm(x, weight, **kw, config=config, launcher=launcher)
        assert_close(f"rms_norm unit_offset={unit_offset}", out, ops.rms_norm(x, weight, **kw), *_tol(dtype))
        out, summed = rms_norm.rms_norm(x, residual, weight, **kw, config=config, launcher=launcher)
        ref, ref_summed = ops.rms_norm(x, residual, weight, **kw)
        assert_close("rms_norm residual sum", summed, ref_summed, 0.0, 0.0)
        assert_close(f"rms_norm+residual unit_offset={unit_offset}", out, ref, *_tol(dtype))


def _check_head_rms_norm(launcher, device, dtype, config, num_heads, num_kv_heads, head_dim, num_tokens=7):
    # q and k as strided column slices of a qkv projection, as the graph feeds them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_heads * head_dim], qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]
    weight = torch.randn(head_dim, dtype=dtype, device=device) * 0.1 + 1
    for x, heads in ((q, num_heads), (k, num_kv_heads)):
        kw = dict(num_heads=heads, head_dim=head_dim, eps=1e-6)
        out = rms_norm.head_rms_norm(x, weight, **kw, config=config, launcher=launcher)
        assert_close(f"head_rms_norm heads={heads} D={head_dim}", out, ops.head_rms_norm(x, weight, **kw), *_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    problem = {"H": 576, "num_heads": 1}
    space = rms_norm.config_space(problem)
    assert rms_norm.default_config(problem) in space
    assert any(c["constexprs"]["BLOCK_H"] < 576 for c in space), "the looped (two-pass) path must be offered"
    for config in _pick(space, rms_norm.default_config(problem), 4):
        _check_rms_norm(CPU, "cpu", dtype, config)
    # a float32 weight on bf16 activations: the reference promotes the output unless unit_offset
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    weight = torch.randn(576)
    for unit_offset in (False, True):
        out = rms_norm.rms_norm(x, weight, eps=1e-5, unit_offset=unit_offset, config=rms_norm.default_config(problem),
                                launcher=CPU)
        ref = ops.rms_norm(x, weight, eps=1e-5, unit_offset=unit_offset)
        assert_close(f"rms_norm float32 weight unit_offset={unit_offset}", out, ref, *_tol(ref.dtype))
    big = {"H": 1536, "num_heads": 1}  # 1536 is not a power of two: masked tail in every path
    for config in _pick(rms_norm.config_space(big), rms_norm.default_config(big), 2):
        _check_rms_norm(CPU, "cpu", dtype, config, hidden=1536, num_tokens=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 4, 64), (16, 4, 128), (16, 2, 128)])
def test_head_rms_norm(dtype, num_heads, num_kv_heads, head_dim):
    problem = {"H": head_dim, "num_heads": num_heads}
    space = rms_norm.config_space(problem)
    assert rms_norm.default_config(problem) in space
    for config in _pick(space, rms_norm.default_config(problem), 3):
        _check_head_rms_norm(CPU, "cpu", dtype, config, num_heads, num_kv_heads, head_dim)


# ------------------------------------------------------------ rope

ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
]


def _check_rope(launcher, device, dtype, config, num_heads, num_kv_heads, head_dim, rotary_dim, style, scaling,
                num_tokens=7):
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_heads * head_dim], qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]
    # large positions too: cos/sin of big angles must stay accurate
    positions = torch.tensor([0, 1, 15, 16, 4095, 33000, 131071][:num_tokens], device=device)
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                 theta=1e6, style=style, scaling=scaling)
    inv_freq, attention_scaling = rope_math.rope_inv_freq(rotary_dim, 1e6, scaling)
    q_out, k_out = rope.rope(q, k, positions, **attrs, inv_freq=inv_freq.to(device),
                             attention_scaling=attention_scaling, config=config, launcher=launcher)
    q_ref, k_ref = ops.rope(q, k, positions, **attrs)
    name = f"rope {style} D={head_dim} R={rotary_dim} {scaling and scaling['rope_type']}"
    assert_close(name + " q", q_out, q_ref, *_tol(dtype))
    assert_close(name + " k", k_out, k_ref, *_tol(dtype))


ROPE_CASES = [  # (Hq, Hk, D, rotary_dim): GQA 3:1, 4:1, 8:1; partial rotary
    (12, 4, 64, 64), (16, 4, 128, 128), (16, 2, 128, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim", ROPE_CASES)
def test_rope(dtype, style, num_heads, num_kv_heads, head_dim, rotary_dim):
    problem = {"head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    space = rope.config_space(problem)
    assert rope.default_config(problem) in space
    for i, config in enumerate(_pick(space, rope.default_config(problem), 2)):
        for scaling in ROPE_SCALINGS if i == 0 else ROPE_SCALINGS[:1]:
            _check_rope(CPU, "cpu", dtype, config, num_heads, num_kv_heads, head_dim, rotary_dim, style, scaling)


# ------------------------------------------------------------ kv_cache_write


def _check_kv_cache_write(launcher, device, dtype, config, num_kv_heads, head_dim, cache_dtype=None):
    num_blocks, block_size, num_tokens = 6, 16, 33
    cache_dtype = cache_dtype or dtype
    kv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, dtype=dtype, device=device)
    # strided k and v, as slices of a qkv output
    k, v = kv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim], kv[:, 2 * num_kv_heads * head_dim:]
    # 33 tokens crossing block boundaries (15 -> 16 -> ... -> 47), out of order, plus padding
    slots = torch.arange(15, 15 + num_tokens, device=device)
    slots = slots[torch.randperm(num_tokens, device=device)]
    slots[[0, 7, 20]] = -1
    for slot_dtype in (torch.int64, torch.int32):
        # non-zero sentinel: untouched slots must keep it
        k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=cache_dtype, device=device)
        v_cache = torch.full_like(k_cache, -3.0)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        attrs = dict(num_kv_heads=num_kv_heads, head_dim=head_dim)
        result = kv_cache.kv_cache_write(k, v, slots.to(slot_dtype), k_cache, v_cache, **attrs,
                                         config=config, launcher=launcher)
        assert result is None
        ops.kv_cache_write(k, v, slots, k_ref, v_ref, **attrs)
        assert_close("k_cache", k_cache, k_ref, 0.0, 0.0)
        assert_close("v_cache", v_cache, v_ref, 0.0, 0.0)
    # a fully padded batch (slot -1 everywhere) writes nothing
    before = k_cache.clone()
    kv_cache.kv_cache_write(k, v, torch.full_like(slots, -1), k_cache, v_cache, **attrs, config=config,
                            launcher=launcher)
    assert torch.equal(k_cache, before), "a padded token (slot -1) modified the cache"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(4, 64), (2, 128), (1, 128)])
def test_kv_cache_write(dtype, num_kv_heads, head_dim):
    problem = {"num_kv_heads": num_kv_heads, "head_dim": head_dim}
    space = kv_cache.config_space(problem)
    assert kv_cache.default_config(problem) in space
    for config in _pick(space, kv_cache.default_config(problem), 2):
        _check_kv_cache_write(CPU, "cpu", dtype, config, num_kv_heads, head_dim)


def test_kv_cache_write_casts_to_cache_dtype():
    problem = {"num_kv_heads": 2, "head_dim": 64}
    _check_kv_cache_write(CPU, "cpu", torch.float32, kv_cache.default_config(problem), 2, 64,
                          cache_dtype=torch.bfloat16)


# ------------------------------------------------------------ gated_act


def _check_gated_act(launcher, device, dtype, config, intermediate=1536, num_tokens=7):
    gate_up = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=device) * 3
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0, 1e-4, -1e-4])  # saturation, tiny
    for act in activation.ACTIVATIONS:
        out = activation.gated_act(gate_up, act=act, config=config, launcher=launcher)
        assert_close(f"gated_act {act} merged", out, ops.gated_act(gate_up, act=act), *_tol(dtype))
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]  # strided views
        out = activation.gated_act(gate, up, act=act, config=config, launcher=launcher)
        assert_close(f"gated_act {act} split", out, ops.gated_act(gate, up, act=act), *_tol(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(2z) -> inf saturates tanh
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_act(dtype):
    problem = {"I": 1536}
    space = activation.config_space(problem)
    assert activation.default_config(problem) in space
    for config in _pick(space, activation.default_config(problem), 3):
        _check_gated_act(CPU, "cpu", dtype, config)
    _check_gated_act(CPU, "cpu", dtype, activation.default_config({"I": 50}), intermediate=50, num_tokens=1)


# ------------------------------------------------------------ argmax


def _argmax_logits(device, vocab):
    logits = torch.randn(5, vocab, device=device)
    logits[1, [7, vocab // 2, vocab - 1]] = 50.0  # ties across splits: lowest index wins
    logits[2] = float("-inf")  # all -inf: index 0, like torch
    logits[3, [vocab - 3, vocab // 3]] = float("nan")  # NaN is the maximum: first NaN wins
    logits[4] = 0.0
    logits[4, 3] = -0.0  # -0.0 == +0.0 ties
    return logits


def _check_argmax(launcher, device, config, vocab):
    logits = _argmax_logits(device, vocab)
    out = sampling.argmax(logits, config=config, launcher=launcher)
    assert_close(f"argmax V={vocab} {config['constexprs']}", out, ops.argmax(logits), 0, 0)


def test_argmax():
    problem = {"V": 49152, "R": 5}
    space = sampling.config_space(problem)
    assert sampling.default_config(problem) in space
    assert sampling.default_config({"V": 49152, "R": 1})["constexprs"]["NUM_SPLITS"] > 1
    for config in _pick(space, sampling.default_config(problem), 6):
        _check_argmax(CPU, "cpu", config, 49152)
    _check_argmax(CPU, "cpu", sampling.default_config({"V": 151936, "R": 1}), 151936)
    _check_argmax(CPU, "cpu", sampling.default_config({"V": 100, "R": 1}), 100)


# ------------------------------------------------------------ meta tensors


class _RecordingLauncher:
    """Records launches without running them: what a plan build does over meta tensors."""

    def __init__(self) -> None:
        self.calls: list[KernelCall] = []

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        assert all(isinstance(g, int) for g in grid), f"{kernel.fn.__name__}: grid {grid} is not host ints"
        # record_call checks the argument count, types and constexpr names against the kernel
        self.calls.append(record_call(kernel, args, constexprs, num_warps, num_stages))


def test_wrappers_run_on_meta_tensors():
    """No wrapper reads tensor values on the host (plans record launches over meta tensors)."""
    rec, meta, bf16 = _RecordingLauncher(), "meta", torch.bfloat16
    t, hidden = 7, 576
    x = torch.empty(t, hidden, dtype=bf16, device=meta)
    w = torch.empty(hidden, dtype=bf16, device=meta)
    table = torch.empty(100, hidden, dtype=bf16, device=meta)
    embedding.embedding(torch.empty(t, dtype=torch.int64, device=meta), table,
                        config=embedding.default_config({"H": hidden}), launcher=rec)
    y, summed = rms_norm.rms_norm(x, x, w, eps=1e-6, config=rms_norm.default_config({"H": hidden}), launcher=rec)
    assert y.shape == summed.shape == (t, hidden) and y.device.type == "meta"
    qkv = torch.empty(t, 24 * 64, dtype=bf16, device=meta)
    q, k = qkv[:, :16 * 64], qkv[:, 16 * 64:20 * 64]
    rms_norm.head_rms_norm(q, torch.empty(64, dtype=bf16, device=meta), num_heads=16, head_dim=64, eps=1e-6,
                           config=rms_norm.default_config({"H": 64, "num_heads": 16}), launcher=rec)
    rope.rope(q, k, torch.empty(t, dtype=torch.int64, device=meta), num_heads=16, num_kv_heads=4, head_dim=64,
              rotary_dim=64, theta=1e4, inv_freq=torch.empty(32, device=meta), attention_scaling=1.0,
              config=rope.default_config({"head_dim": 64, "num_heads": 16, "num_kv_heads": 4}), launcher=rec)
    cache = torch.empty(8, 16, 4, 64, dtype=bf16, device=meta)
    kv_cache.kv_cache_write(k, k, torch.empty(t, dtype=torch.int64, device=meta), cache, cache, num_kv_heads=4,
                            head_dim=64, config=kv_cache.default_config({"num_kv_heads": 4, "head_dim": 64}),
                            launcher=rec)
    activation.gated_act(torch.empty(t, 3072, dtype=bf16, device=meta), act="silu",
                         config=activation.default_config({"I": 1536}), launcher=rec)
    logits = torch.empty(2, 151936, device=meta)
    sampling.argmax(logits, config=sampling.default_config({"V": 151936, "R": 2}), launcher=rec)
    names = [call.kernel.split(":")[1] for call in rec.calls]
    assert names == ["_embedding_kernel", "_rms_norm_kernel", "_rms_norm_kernel", "_rope_kernel",
                     "_kv_cache_write_kernel", "_gated_act_kernel", "_argmax_partial_kernel",
                     "_argmax_merge_kernel"], names


# ------------------------------------------------------------ on the GPU


def _gpu_embedding(jit, dev, dtype):
    for config in embedding.config_space({"H": 576}):
        _check_embedding(jit, dev, dtype, config)


def _gpu_rms_norm(jit, dev, dtype):
    for config in rms_norm.config_space({"H": 576, "num_heads": 1}):
        _check_rms_norm(jit, dev, dtype, config, num_tokens=33)
    big = {"H": 8192, "num_heads": 1}
    for config in _pick(rms_norm.config_space(big), rms_norm.default_config(big), 6):
        _check_rms_norm(jit, dev, dtype, config, hidden=8192)
    for heads, kv_heads, head_dim in [(12, 4, 64), (16, 4, 128), (16, 2, 128)]:
        problem = {"H": head_dim, "num_heads": heads}
        for config in _pick(rms_norm.config_space(problem), rms_norm.default_config(problem), 6):
            _check_head_rms_norm(jit, dev, dtype, config, heads, kv_heads, head_dim, num_tokens=33)


def _gpu_rope(jit, dev, dtype):
    for heads, kv_heads, head_dim, rotary_dim in ROPE_CASES:
        problem = {"head_dim": head_dim, "num_heads": heads, "num_kv_heads": kv_heads}
        for config in _pick(rope.config_space(problem), rope.default_config(problem), 4):
            for style in ("neox", "gptj"):
                for scaling in ROPE_SCALINGS:
                    _check_rope(jit, dev, dtype, config, heads, kv_heads, head_dim, rotary_dim, style, scaling)


def _gpu_kv_cache_write(jit, dev, dtype):
    for kv_heads, head_dim in [(4, 64), (2, 128), (8, 128)]:
        for config in kv_cache.config_space({"num_kv_heads": kv_heads, "head_dim": head_dim}):
            _check_kv_cache_write(jit, dev, dtype, config, kv_heads, head_dim)


def _gpu_gated_act(jit, dev, dtype):
    for config in activation.config_space({"I": 1536}):
        _check_gated_act(jit, dev, dtype, config, num_tokens=33)


def _gpu_argmax(jit, dev, dtype):
    for vocab in (49152, 151936):
        for rows in (1, 64):
            _check_argmax(jit, dev, sampling.default_config({"V": vocab, "R": rows}), vocab)
        for config in sampling.config_space({"V": vocab}):
            _check_argmax(jit, dev, config, vocab)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA/HIP GPU")
@pytest.mark.parametrize("family", [_gpu_embedding, _gpu_rms_norm, _gpu_rope, _gpu_kv_cache_write, _gpu_gated_act,
                                    _gpu_argmax], ids=lambda f: f.__name__[5:])
def test_small_kernels_gpu(family):
    torch.manual_seed(0)
    family(JitLauncher(), "cuda", torch.bfloat16)
