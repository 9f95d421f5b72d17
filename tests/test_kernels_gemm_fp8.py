"""FP8 GEMM family (`linear_fp8`) against the IR reference, under the Triton interpreter, plus
cross-compilation of every default config for the FP8 targets.

The kernels quantize activations bit-identically to the reference (checked directly on ties,
subnormals and clamped values), so outputs differ only by fp32 summation order and by where the
scales multiply (after the dot, not into each operand; on sm90 the FP8 dot's accumulator is promoted
to fp32 every BLOCK_K, see test_sm90_fp8_dot_promotes_its_accumulator_every_block_k): fp32 x is
compared at atol = rtol = 2e-5 on O(1) outputs (weight scales carry 1/sqrt(K)); bf16 x at atol 1e-3,
rtol 1e-2 (one bf16 ulp is at most 2**-7 relative: the two fp32 results may round to neighbouring bf16
values).
"""

from __future__ import annotations

import math

import pytest
import torch

from rdnac.compiler.build import check_resources, compile_calls
from rdnac.compiler.record import RecordingLauncher
from rdnac.ir import ops
from rdnac.ir.fp8 import FORMATS, FP8_MAX, quantize_rows
from rdnac.kernels import fp8_quant, gemm_fp8
from rdnac.kernels.gemm import DECODE_MAX_M
from rdnac.kernels.launch import InterpretLauncher, JitLauncher
from tests.support.aot import aot_launcher

SHAPES = [(384, 256), (256, 384), (1536, 512)]  # (N, K), multiples of the 128 x 128 scale block
TOKENS = [1, 7, 33]
FORMATS_ = ["e4m3fn", "e4m3fnuz"]
BLOCK = [128, 128]
# name -> (weight_scheme, act_scheme)
VARIANTS = {"token_channel": ("channel", "dynamic_token"), "static_tensor": ("tensor", "static"),
            "block": ("block", "dynamic_group"), "a16_channel": ("channel", "none"),
            "a16_tensor": ("tensor", "none"), "a16_block": ("block", "none")}
MIXED = {"token_tensor": ("tensor", "dynamic_token"), "static_channel": ("channel", "static"),
         "block_token": ("block", "dynamic_token"), "channel_group": ("channel", "dynamic_group")}
# (atol, rtol). bf16 allows two bf16 ulps (2 x 2^-7): on the H200 the fp32 accumulation order of
# wgmma vs the CPU reference moved outputs near 2-4 by 0.031 (seen 2026-11-22, M=33 N=1536 K=512).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-3, 1.6e-2)}

INTERPRET = InterpretLauncher()


def _problem(M, N, K, dtype, has_bias, variant, fmt) -> dict:
    weight_scheme, act_scheme = {**VARIANTS, **MIXED}[variant]
    return {"M": M, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "has_bias": has_bias,
            "weight_scheme": weight_scheme, "act_scheme": act_scheme, "fp8_format": fmt,
            "block_size": BLOCK if weight_scheme == "block" or act_scheme == "dynamic_group" else None}


def _quantize_weight(w: torch.Tensor, scheme: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 [N, K] and its float32 scale ([1], [N] or [cdiv(N, 128), cdiv(K, 128)]), as a checkpoint holds them."""
    N, K = w.shape
    if scheme == "tensor":
        q, s = quantize_rows(w.reshape(1, -1), fmt)
        return q.reshape(N, K), s.reshape(1)
    if scheme == "channel":
        q, s = quantize_rows(w, fmt)
        return q, s.reshape(N)
    bn, bk = BLOCK
    padded = torch.nn.functional.pad(w, (0, (-K) % bk, 0, (-N) % bn))
    tiles = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    s = tiles.abs().amax((1, 3)) / FP8_MAX[fmt]  # [cdiv(N, bn), cdiv(K, bk)]
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).reshape(padded.shape)[:N, :K]
    return q.to(FORMATS[fmt]), s


def _operands(M, N, K, dtype, has_bias, variant, fmt, device="cpu", seed=0):
    """(x, weight, weight_scale, rest, attrs); x has a zero row (scale 1, not 0/0) when M > 3."""
    weight_scheme, act_scheme = {**VARIANTS, **MIXED}[variant]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)  # [M, K]
    if M > 3:
        x[2] = 0
    weight, weight_scale = _quantize_weight(torch.randn(N, K, generator=g), weight_scheme, fmt)
    weight_scale = weight_scale / math.sqrt(K)  # O(1) outputs
    rest = []
    if act_scheme == "static":  # amax of x near 4: the largest values clamp to FP8_MAX
        rest.append(torch.tensor([3.0 / FP8_MAX[fmt]]))
    if has_bias:
        rest.append(torch.randn(N, generator=g).to(dtype))
    attrs = dict(weight_scheme=weight_scheme, act_scheme=act_scheme, fp8_format=fmt,
                 block_size=_problem(M, N, K, dtype, has_bias, variant, fmt)["block_size"], has_bias=has_bias)
    move = lambda t: t.to(device)  # noqa: E731
    return move(x.to(dtype)), move(weight), move(weight_scale), [move(t) for t in rest], attrs


def _check(M, N, K, dtype, has_bias, variant, fmt, config, launcher, device="cpu"):
    x, weight, weight_scale, rest, attrs = _operands(M, N, K, dtype, has_bias, variant, fmt, device)
    out = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=launcher)
    # The reference runs on CPU: CUDA torch divides by a scalar through its reciprocal, which would
    # move an activation scale by an ulp.
    ref = ops.linear_fp8(x.cpu(), weight.cpu(), weight_scale.cpu(), *(t.cpu() for t in rest), **attrs)
    what = f"linear_fp8 {variant} {fmt} M={M} N={N} K={K} {dtype} bias={has_bias} {config}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    atol, rtol = TOLERANCES[dtype]
    out, ref = out.cpu().float(), ref.float()
    err = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol})"


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("fmt", FORMATS_)
@pytest.mark.parametrize("group", [0, 128])
def test_quantize_matches_reference_bits(fmt, group):
    """Every representable value, every midpoint (ties), subnormals and clamped values: the kernel's
    fp8 bits and scales equal `quantize_rows`' (the interpreter's own fp32 -> fp8 cast would not)."""
    grid = torch.arange(256, dtype=torch.uint8).view(FORMATS[fmt]).float()
    grid = grid[~grid.isnan()].unique()  # sorted
    ties = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, ties, torch.randn(600) * 1e-2, torch.randn(600) * 50])
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    K = 1280  # two quant steps per row (10 groups of 128, 8 per step; 1024 + 256 columns); last row zero
    x = torch.nn.functional.pad(values, (0, (-values.numel()) % K)).reshape(-1, K)
    x = torch.cat([x, torch.zeros(1, K)])
    # Row amax = FP8_MAX makes the scale exactly 1 for the grid rows, so ties stay ties.
    x[:, 0] = FP8_MAX[fmt]
    q, scale = fp8_quant.quantize_activations(x, None, fmt, group, launcher=INTERPRET)
    q_ref, scale_ref = quantize_rows(x, fmt, group)
    assert torch.equal(scale.reshape(scale_ref.shape), scale_ref), f"{fmt} group={group}: scales differ"
    # -0 may be stored as +0 (the kernel never writes -0: it is NaN in e4m3fnuz); values must be equal.
    diff = (q.float() != q_ref.float()).sum().item()
    assert diff == 0, f"{fmt} group={group}: {diff} fp8 values differ"


@pytest.mark.parametrize("fmt", FORMATS_)
def test_static_quantize_clamps_like_reference(fmt):
    x = torch.randn(5, 300) * 4  # [T, K]
    s = torch.tensor([2.0 / FP8_MAX[fmt]])
    q, scale = fp8_quant.quantize_activations(x, s, fmt, 0, launcher=INTERPRET)
    q_ref = (x / s).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(FORMATS[fmt])
    assert scale is s and torch.equal(q.float(), q_ref.float())


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("variant", list(VARIANTS) + list(MIXED))
@pytest.mark.parametrize("M", [1, 8, 16, 32, 64, 128, 256, 2048])
@pytest.mark.parametrize("N,K", SHAPES + [(256, 4096), (7168, 2048), (4096, 7168)])
def test_config_space_is_sound(variant, M, N, K):
    problem = _problem(M, N, K, torch.bfloat16, True, variant, "e4m3fn")
    space = gemm_fp8.config_space(problem)
    assert 1 <= len(space) <= 24
    assert gemm_fp8.default_config(problem) in space
    is_block = problem["block_size"] is not None
    for config in space:
        c = config["constexprs"]
        assert min(c["BLOCK_M"], c["BLOCK_N"]) >= 16 and c["BLOCK_K"] >= 32, config  # FP8 dot minimum
        if M <= DECODE_MAX_M:
            assert c["BLOCK_M"] == 16 and c["GROUP_SIZE_M"] == 1, config
        if is_block:
            assert BLOCK[1] % c["BLOCK_K"] == 0, config
            if problem["weight_scheme"] == "block":
                assert BLOCK[0] % c["BLOCK_N"] == 0, config
        k_per_split = -(-(-(-K // c["SPLIT_K"])) // c["BLOCK_K"]) * c["BLOCK_K"]
        assert -(-K // k_per_split) == c["SPLIT_K"], config  # no empty or truncated split


def test_wrapper_runs_on_meta_tensors():
    # Proves the wrapper never reads tensor values on the host, and that split-K scales once.
    M, N, K = 7, 576, 4608
    for variant in VARIANTS:
        problem = _problem(M, N, K, torch.bfloat16, True, variant, "e4m3fn")
        config = gemm_fp8.default_config(problem)
        assert config["constexprs"]["SPLIT_K"] > 1, variant
        x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, "e4m3fn",
                                                         device="meta")
        recorder = RecordingLauncher()
        out = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=recorder)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16 and out.is_meta
        names = [call.kernel.rpartition(":")[2] for call in recorder.calls]
        assert names[-1] == "_fp8_splitk_reduce_kernel" and ("_quant_fp8_kernel" in names) == (variant[:3] != "a16")
        assert recorder.calls[-1].constexprs["HAS_BIAS"] and not recorder.calls[-2].constexprs["HAS_BIAS"]


# ---------------------------------------------------------------- interpreter


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("M", TOKENS)
def test_linear_fp8_default_config(variant, M):
    # Formats, bias and dtype rotate over the shapes so each variant meets each of them at each M.
    for i, (N, K) in enumerate(SHAPES):
        fmt = FORMATS_[(i + M) % 2]
        has_bias = (i + M // 7) % 2 == 0
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        config = gemm_fp8.default_config(_problem(M, N, K, dtype, has_bias, variant, fmt))
        _check(M, N, K, dtype, has_bias, variant, fmt, config, INTERPRET)


@pytest.mark.parametrize("fmt", FORMATS_)
@pytest.mark.parametrize("variant", list(MIXED))
def test_linear_fp8_mixed_schemes(variant, fmt):
    # Block weights with per-token activations, per-channel weights with per-group activations, ...
    N, K = SHAPES[1]
    _check(7, N, K, torch.float32, True, variant, fmt, gemm_fp8.default_config(_problem(7, N, K, torch.float32, True,
                                                                                   variant, fmt)), INTERPRET)


def test_linear_fp8_every_decode_candidate():
    # N * K = 1M: split-K candidates (2/4/8, the reduce kernel applying both scales and the bias) are offered.
    M, N, K = 7, 256, 4096
    space = gemm_fp8.config_space(_problem(M, N, K, torch.float32, True, "token_channel", "e4m3fn"))
    assert any(c["constexprs"]["SPLIT_K"] > 1 for c in space)
    for config in space:
        _check(M, N, K, torch.float32, True, "token_channel", "e4m3fn", config, INTERPRET)


@pytest.mark.parametrize("variant", ["block", "a16_block", "a16_channel", "static_tensor"])
def test_linear_fp8_split_k(variant):
    # Split-K for the other kernels (block: partials already scaled; a16w8: no row scale), on a
    # smaller weight than the space offers it for, to stay affordable under the interpreter.
    M, N, K = 7, 384, 1024
    config = gemm_fp8._config(16, 64, 128, 1, 4, 4, 2)
    for fmt, dtype in (("e4m3fn", torch.float32), ("e4m3fnuz", torch.bfloat16)):
        _check(M, N, K, dtype, True, variant, fmt, config, INTERPRET)


@pytest.mark.parametrize("variant", ["token_channel", "block", "a16_channel", "static_tensor"])
def test_self_reduce_split_k_is_bit_identical(variant):
    """SELF_REDUCE (no reduce launch; see gemm.py) writes the reduce kernel's bits: the row and column
    scales and the bias in the same order; the arrival counters end at 0."""
    from rdnac.kernels.gemm import split_k_counters

    M, N, K = 7, 384, 1024
    x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, "e4m3fn")
    config = gemm_fp8._config(16, 64, 128, 1, 4, 4, 2)
    one = {**config, "constexprs": {**config["constexprs"], "SELF_REDUCE": True}}
    two_kernels = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=INTERPRET)
    for _ in range(2):
        out = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=one, launcher=INTERPRET)
        assert torch.equal(out, two_kernels), variant
    assert not split_k_counters(x.device, 1).any()


def test_self_reduce_split_k_builds_for_sm90_and_gfx942():
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.record import RecordingLauncher

    calls = []
    for variant, fmt in (("block", "e4m3fn"), ("token_channel", "e4m3fnuz")):
        x, weight, weight_scale, rest, attrs = _operands(1, 4096, 12288, torch.bfloat16, False, variant, fmt,
                                                         device="meta")
        for config in gemm_fp8.config_space(_problem(1, 4096, 12288, torch.bfloat16, False, variant, fmt)):
            if config["constexprs"]["SPLIT_K"] > 1:
                rec = RecordingLauncher()
                one = {**config, "constexprs": {**config["constexprs"], "SELF_REDUCE": True}}
                gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=one, launcher=rec)
                assert not any("reduce" in c.kernel for c in rec.calls)
                calls += [(fmt, c) for c in rec.calls]
    for target, fmt in (("sm90", "e4m3fn"), ("gfx942", "e4m3fnuz")):
        binaries = compile_calls([c for f, c in calls if f == fmt], target, quiet=True)
        assert binaries and all(check_resources(b, target) == [] for b in binaries), target


@pytest.mark.parametrize("M,N,variant", [(33, 256, "token_channel"), (33, 256, "block"), (72, 256, "a16_channel"),
                                         (260, 128, "a16_block")])
def test_linear_fp8_every_candidate_larger_m(M, N, variant):
    # The M > 16 buckets (row tiles of 32..128, grouped order); a16w8 at M > 64 skips the per-row
    # quant programs, which the interpreter runs slowly.
    K = 256
    for config in gemm_fp8.config_space(_problem(M, N, K, torch.float32, True, variant, "e4m3fnuz")):
        _check(M, N, K, torch.float32, True, variant, "e4m3fnuz", config, INTERPRET)


def test_linear_fp8_prefill_quantized():
    # Block quant at the M <= 256 bucket (grouped tile order) with fp8 activations.
    M, (N, K) = 130, SHAPES[0]
    config = gemm_fp8.default_config(_problem(M, N, K, torch.bfloat16, True, "block", "e4m3fn"))
    _check(M, N, K, torch.bfloat16, True, "block", "e4m3fn", config, INTERPRET)


# ---------------------------------------------------------------- cross-compilation

FP8_TARGETS = {"sm90": "e4m3fn", "gfx1201": "e4m3fn", "gfx950": "e4m3fn", "gfx942": "e4m3fnuz"}
COMPILE_BUCKETS = (1, 32, 64, 256, 2048)  # one per distinct default config
COMPILE_SHAPE = (1536, 4096)  # large enough that decode splits K (the reduce kernel compiles too)


def _record_defaults(fmt: str, variants) -> list:
    recorder = RecordingLauncher()
    N, K = COMPILE_SHAPE
    for variant in variants:
        for M in COMPILE_BUCKETS:
            problem = _problem(M, N, K, torch.bfloat16, True, variant, fmt)
            x, weight, weight_scale, rest, attrs = _operands(min(M, 300), N, K, torch.bfloat16, True, variant, fmt,
                                                             device="meta")
            gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=gemm_fp8.default_config(problem),
                                launcher=recorder)
    return recorder.calls


@pytest.mark.slow
@pytest.mark.parametrize("target", list(FP8_TARGETS) + ["gfx1151"])
def test_default_configs_compile(target):
    """Every default config compiles with no spills and within LDS; FP8 dots use FP8 matrix instructions
    where the target has them (gfx1151 has none: a16w8 only, bf16 WMMA)."""
    fmt = FP8_TARGETS.get(target, "e4m3fn")
    variants = [v for v in VARIANTS if v.startswith("a16")] if target == "gfx1151" else list(VARIANTS)
    binaries = compile_calls(_record_defaults(fmt, variants), target, quiet=True)
    used = {}
    for b in binaries:
        assert check_resources(b, target) == [], b.key
        name = b.kernel.rpartition(":")[2]
        if "gemm" in name:
            assert b.resources.matrix_instructions, f"{target}: {b.key} uses no matrix instruction"
            kind = "a16" if b.call.constexprs["IS_A16"] else "fp8"
            used.setdefault((name, kind), set()).update(b.resources.matrix_instructions)
    print(f"\n{target}: " + "; ".join(f"{n} {k}: {sorted(v)}" for (n, k), v in sorted(used.items())))
    for (name, kind), instructions in used.items():
        text = " ".join(instructions)
        if kind == "fp8" and target.startswith("gfx"):
            assert "fp8" in text or "f8" in text, f"{target} {name}: FP8 dot lowered to {text}"
        if kind == "fp8" and target == "sm90":  # wgmma e4m3 at BLOCK_M >= 64; mma.sync f16 at decode
            assert "e4m3" in text, f"sm90 {name}: FP8 dot lowered to {text}"


@pytest.mark.parametrize("M", [256, 2048])
def test_sm90_fp8_dot_promotes_its_accumulator_every_block_k(M):
    """Hopper's FP8 wgmma accumulates with ~14 mantissa bits, and Triton's sm90 default keeps it there
    for the whole K loop (maxNumImpreciseAcc 2**30): on an H100, K = 4096 outputs moved by 4 bf16 ulps
    (test_linear_fp8_gpu, 2026-12-06). The per-token/channel kernel promotes to an fp32 add every BLOCK_K."""
    import re

    from rdnac.targets.compile import triton_compile

    N, K = COMPILE_SHAPE
    recorder = RecordingLauncher()
    x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, False, "token_channel", "e4m3fn",
                                                     device="meta")
    config = gemm_fp8.default_config(_problem(M, N, K, torch.bfloat16, False, "token_channel", "e4m3fn"))
    gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=recorder)
    (call,) = [c for c in recorder.calls if c.kernel.endswith(":_fp8_gemm_kernel")]
    compiled = triton_compile(call, "sm90")
    assert "wgmma" in compiled.asm["ptx"], f"M={M}: {config} did not lower to wgmma"
    block_k = config["constexprs"]["BLOCK_K"]
    assert re.findall(r"maxNumImpreciseAcc = (\d+)", compiled.asm["ttgir"]) == [str(block_k)]
    promotions = compiled.asm["ptx"].count("add.f32")  # one fp32 add per accumulator register per BLOCK_K
    bm, bn = config["constexprs"]["BLOCK_M"], config["constexprs"]["BLOCK_N"]
    assert promotions >= bm * bn // (32 * call.num_warps), f"M={M}: {promotions} fp32 adds"


# ---------------------------------------------------------------- GPU


def _gpu_formats() -> list[str]:
    if torch.version.hip and "gfx94" in torch.cuda.get_device_properties(0).gcnArchName:
        return ["e4m3fnuz"]
    return ["e4m3fn"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_linear_fp8_gpu(tmp_path):
    """Every candidate for the main variants (bias on), the default config otherwise; bf16 activations.
    Built ahead of time by parallel workers (`tests.support.aot`): JIT-compiled one after another, the
    sweep ran past a device call's limit (2026-12-06)."""
    cases = []
    for fmt in _gpu_formats():
        for variant in list(VARIANTS) + list(MIXED):
            for M in TOKENS + [300]:
                for N, K in SHAPES + [(256, 4096)]:
                    for has_bias in (False, True):
                        problem = _problem(M, N, K, torch.bfloat16, has_bias, variant, fmt)
                        every = has_bias and variant in VARIANTS
                        for config in gemm_fp8.config_space(problem) if every else [gemm_fp8.default_config(problem)]:
                            cases.append((M, N, K, torch.bfloat16, has_bias, variant, fmt, config))
    recorder = RecordingLauncher()
    for M, N, K, dtype, has_bias, variant, fmt, config in cases:
        x, weight, weight_scale, rest, attrs = _operands(M, N, K, dtype, has_bias, variant, fmt, device="meta")
        gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=recorder)
    launcher = aot_launcher(recorder.calls, tmp_path)
    for case in cases:
        _check(*case, launcher, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_self_reduce_gpu_bit_identical_in_a_replayed_graph():
    """8B decode shapes: SELF_REDUCE equals the two-kernel path bit for bit, eagerly and over 20
    replays of a captured graph (a race between a tile's splits would show as a wrong sum)."""
    launcher = JitLauncher()
    fmt = "e4m3fnuz" if torch.version.hip and "gfx94" in torch.cuda.get_device_properties(0).gcnArchName else "e4m3fn"
    for variant in ("block", "token_channel"):
        for N, K in ((4096, 4096), (4096, 12288), (6144, 4096)):
            x, weight, weight_scale, rest, attrs = _operands(1, N, K, torch.bfloat16, True, variant, fmt, device="cuda")
            for config in gemm_fp8.config_space(_problem(1, N, K, torch.bfloat16, True, variant, fmt)):
                if config["constexprs"]["SPLIT_K"] == 1:
                    continue
                one = {**config, "constexprs": {**config["constexprs"], "SELF_REDUCE": True}}
                run = lambda cfg: gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs,  # noqa: E731
                                                      config=cfg, launcher=launcher)
                expected = run(config)
                assert torch.equal(run(one), expected), (variant, config)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = run(one)
                for _ in range(20):
                    graph.replay()
                    torch.cuda.synchronize()
                    assert torch.equal(out, expected), (variant, config)


class _EarlyWeights:
    """The interpreter with EARLY_WEIGHTS=True added to every launch of a kernel that takes it (the plan's
    recorder adds it only with PDL, which the interpreter has no use for: this runs its peeled first step)."""

    def __init__(self) -> None:
        self.kernels = []

    def launch(self, kernel, grid, args, *, constexprs, **kw):
        if any(p.name == "EARLY_WEIGHTS" for p in kernel.params):
            constexprs = {**constexprs, "EARLY_WEIGHTS": True}
            self.kernels.append(kernel.fn.__name__)
        INTERPRET.launch(kernel, grid, args, constexprs=constexprs, **kw)


@pytest.mark.parametrize("variant,quant_a", [("block", False), ("block", True), ("a16_block", False),
                                             ("channel_group", False)])
@pytest.mark.parametrize("split_k", [1, 4])
def test_early_weight_loads_are_bit_identical(variant, quant_a, split_k):
    """EARLY_WEIGHTS (the first K step's weight tile and scales loaded before the PDL wait, that step out of
    the loop) gives the plain loop's bits: with and without split-K, QUANT_A, a16w8, per-channel weights
    under group activations; K = 1000 leaves a short last step."""
    M, N, K = 3, 384, 1000 if split_k == 1 else 1024
    x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, True, variant, "e4m3fn")
    config = gemm_fp8._config(16, 64, 128, 1, split_k, 4, 2)
    if quant_a:
        config = {**config, "constexprs": {**config["constexprs"], "QUANT_A": True}}
    plain = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=INTERPRET)
    early = _EarlyWeights()
    out = gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=early)
    assert early.kernels == ["_fp8_block_gemm_kernel"]
    assert torch.equal(out, plain), f"{variant} quant_a={quant_a} split_k={split_k}"


def test_early_weight_loads_come_before_the_pdl_wait():
    """The sm90 binary of a decode tile with PDL and EARLY_WEIGHTS issues its weight loads before
    griddepcontrol.wait and its activation loads after; within the target's limits. gfx942 (no PDL) builds."""
    from rdnac.targets.compile import triton_compile

    x, weight, weight_scale, rest, attrs = _operands(1, 4096, 4096, torch.bfloat16, False, "block", "e4m3fn",
                                                     device="meta")
    rec = RecordingLauncher(pdl=True, early_weights=True)
    xq = torch.empty(1, 4096, dtype=torch.float8_e4m3fn, device="meta")
    xs = torch.empty(1, 32, dtype=torch.float32, device="meta")
    gemm_fp8.linear_fp8(xq, weight, weight_scale, xs, **{**attrs, "act_scheme": "prequantized", "group": 128},
                        config=gemm_fp8._config(16, 64, 128, 1, 4, 4, 3), launcher=rec)
    call, = [c for c in rec.calls if "block_gemm" in c.kernel]
    assert call.constexprs["EARLY_WEIGHTS"] is True and call.constexprs["PDL"] is True
    ptx = triton_compile(call, "sm90").asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert "ld.global" in ptx[:wait], "the first weight tile loads before the wait"
    binary, = compile_calls([call], "sm90", quiet=True)
    assert check_resources(binary, "sm90") == []
    plain = RecordingLauncher()  # the AMD targets record no PDL: the plain loop
    gemm_fp8.linear_fp8(xq, weight, weight_scale, xs, **{**attrs, "act_scheme": "prequantized", "group": 128},
                        config=gemm_fp8._config(16, 64, 128, 1, 4, 4, 3), launcher=plain)
    binaries = compile_calls(plain.calls, "gfx942", quiet=True)
    assert all(check_resources(b, "gfx942") == [] for b in binaries)
