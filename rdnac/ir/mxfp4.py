"""MXFP4 (OCP microscaling FP4): the reference codec of 4-bit expert weights.

A row of K weights is stored as K/2 bytes of e2m1 pairs and K/32 e8m0
scales. Element 2i of a row is the low nibble of byte i, element 2i+1 the
high nibble (the layout of GPT-OSS checkpoints' `*_blocks`). An e2m1 nibble
is a sign bit (8) and one of the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; an
e8m0 scale byte s means 2**(s - 127) (255 is NaN in the spec and is refused
by the frontend). Scales are exponents: they are never converted through a
float type on their way to a kernel (a uint8 path that read them as values
zeroed them in the engine rdnac learns from).
"""

from __future__ import annotations

import torch

BLOCK = 32  # elements per e8m0 scale
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _lut(device) -> torch.Tensor:
    mags = torch.tensor(E2M1, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., K] from blocks uint8 [..., K/2] and scales uint8 [..., K/32]."""
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8, (blocks.dtype, scales.dtype)
    k = blocks.shape[-1] * 2
    assert scales.shape[-1] * BLOCK == k and scales.shape[:-1] == blocks.shape[:-1], (blocks.shape, scales.shape)
    lut = _lut(blocks.device)
    b = blocks.long()
    values = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).reshape(*blocks.shape[:-1], k)
    exps = scales.to(torch.int32) - 127
    values = values.reshape(*scales.shape, BLOCK)
    return torch.ldexp(values, exps[..., None].to(torch.float32)).reshape(*blocks.shape[:-1], k)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., K/2], scales uint8 [..., K/32]) of w [..., K] (K a multiple of 32).

    Each block of 32 takes the smallest scale 2**e with amax / 2**e <= 6, so
    nothing saturates (the OCP rule floor(log2(amax)) - 2 clips blocks whose
    amax lies in (6, 8) * 2**e); elements round to the nearest e2m1 magnitude,
    ties to the even code."""
    k = w.shape[-1]
    assert k % BLOCK == 0, f"MXFP4 needs rows that are a multiple of {BLOCK}; got {k}"
    wf = w.float().reshape(*w.shape[:-1], k // BLOCK, BLOCK)
    amax = wf.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(2.0 ** -126) / E2M1[-1])),
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = wf / torch.ldexp(torch.ones_like(exp), exp)[..., None]
    mags = torch.tensor(E2M1, dtype=torch.float32, device=w.device)
    dist = (scaled.abs()[..., None] - mags).abs()  # [..., 32, 8]
    # ties go to the even code: among equal distances argmin takes the first, so break ties explicitly
    best = dist.min(-1, keepdim=True).values
    ties = (dist == best)
    even = ties & (torch.arange(8, device=w.device) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    code = code + 8 * ((scaled < 0) & (code > 0)).long()
    code = code.reshape(*w.shape[:-1], k)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    scales = (exp + 127).to(torch.uint8)
    return blocks, scales
