"""8-bit formats and the reference quantization rules used by the `linear_fp8` and `linear_int8` ops.

Two FP8 formats matter: OCP e4m3fn (max 448; gfx1201, gfx950, sm90) and
e4m3fnuz (max 240; gfx942). The same bits mean half the value in fnuz, and
0x80 is NaN there. Weights are stored as their FP8 bits with float32 scales.

"int8" (W8A8, symmetric, max 127) shares the tables and the rules: x / scale is
clamped to +-127 and rounded to the nearest integer, ties to even, so one
per-token quantization rule (and one set of fused kernels) serves all three.
"""

from __future__ import annotations

import torch

FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz, "int8": torch.int8}
FP8_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0, "int8": 127.0}  # the largest magnitude of each 8-bit format
FP8_FORMATS = ("e4m3fn", "e4m3fnuz")  # the float ones (KV caches, fp8_layout)


def to_format(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """v (float32, already clamped to +-FP8_MAX) in format `fmt`: FP8 by torch's cast (nearest, ties to
    even); int8 rounded to the nearest integer (ties to even) first, as a cast would truncate."""
    return v.round().to(torch.int8) if fmt == "int8" else v.to(FORMATS[fmt])


def quantize_rows(x: torch.Tensor, fmt: str, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) quantization, or per (row, `group` columns) when group > 0.

    Returns (fp8 values [T, K], float32 scales [T, 1] or [T, ceil(K/group)]); a zero
    row gets scale 1 (not 0/0)."""
    xf = x.float()
    num_tokens, k = xf.shape
    if group:
        pad = (-k) % group
        padded = torch.nn.functional.pad(xf, (0, pad)).reshape(num_tokens, -1, group)
        amax = padded.abs().amax(-1)  # [T, G]
        scale = torch.where(amax > 0, amax / FP8_MAX[fmt], torch.ones_like(amax))
        q = (padded / scale[..., None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).reshape(num_tokens, -1)[:, :k]
        return to_format(q, fmt), scale
    amax = xf.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX[fmt], torch.ones_like(amax))
    return to_format((xf / scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]), fmt), scale


def kv_format(dtype: torch.dtype) -> str | None:
    """The FP8 format of a KV cache of `dtype` ("e4m3fn" / "e4m3fnuz"), or None for a float cache."""
    return next((fmt for fmt in FP8_FORMATS if FORMATS[fmt] == dtype), None)


def to_kv_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The values a KV cache of `dtype` stores for x: float caches take x cast; FP8 caches take
    x / scale in float32, saturated to the format's range (torch's cast would make NaN of an
    overflow), rounded to nearest even. The kernels' store path does the same, op for op."""
    fmt = kv_format(dtype)
    if fmt is None:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(dtype)


def from_kv_cache(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 values of cached K or V: FP8 bits times their per-tensor scale; float caches as they are."""
    return cache.float() * scale if kv_format(cache.dtype) else cache.float()


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, scheme: str,
                      block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 [N, K] from fp8 (or int8) bits and a per-tensor [1], per-channel [N] or block [N/bn, K/bk] scale."""
    w = weight.float()
    if scheme == "tensor":
        return w * scale.float().reshape(())
    if scheme == "channel":
        return w * scale.float().reshape(-1, 1)
    if scheme == "block":
        bn, bk = block_size
        s = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return w * s[: w.shape[0], : w.shape[1]]
    raise ValueError(f"unknown FP8 weight scheme {scheme!r}")


def e4m3fn_to_e4m3fnuz(bits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bit-exact OCP e4m3fn -> e4m3fnuz: the same bit pattern is half the value in fnuz, so the
    bits are kept and the scale doubles (returned factor 2.0). -0 (0x80) is NaN in fnuz: it maps to
    +0; OCP NaN (0x7F, 0xFF) maps to fnuz's only NaN, 0x80."""
    u8 = bits.view(torch.uint8)
    is_nan, is_neg_zero = (u8 & 0x7F) == 0x7F, u8 == 0x80
    out = u8.clone()
    out[is_neg_zero] = 0
    out[is_nan] = 0x80
    return out.view(torch.float8_e4m3fnuz), 2.0
