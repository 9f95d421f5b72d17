"""RoPE's tables and rotation, as the references compute them: inverse frequencies for the
scaling variants (linear, llama3, yarn; normalized by the frontend), float32 cos/sin per position,
and the neox / gptj rotation of [T, H, D] rows. The runtime builds its kernels' `inv_freq` input
with `rope_inv_freq`, so references and kernels share one definition.
"""

from __future__ import annotations

import math

import torch

# rope_type -> the parameters it reads, each a positive number (the others are optional)
SCALING_KEYS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings")}


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] and the cos/sin scale for a RoPE variant.

    `scaling` is None or a dict with `rope_type` in {linear, llama3, yarn} and
    that variant's parameters (normalized by the frontend)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if not scaling:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rotary_dim, theta, scaling)
    raise ValueError(f"unknown rope_type {kind!r}")


def _yarn_inv_freq(dim: int, base: float, p: dict) -> tuple[torch.Tensor, float]:
    factor = p["factor"]

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, p["mscale"]) / get_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    max_pos = p["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float,
                 scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim/2] in float32."""
    inv_freq, attention_scaling = rope_inv_freq(rotary_dim, theta, scaling)
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, rotary_dim/2] float32
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if style == "neox":
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rotated = rot * cos2 + torch.cat([-x2, x1], -1) * sin2
    else:  # gptj: interleaved pairs (x0, x1), (x2, x3), ...
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    return torch.cat([rotated, rest], -1)
