"""Write float32 weights as llama.cpp K-quant blocks (Q4_K, Q5_K, Q6_K), for tests that build GGUF files.

gguf's Python package dequantizes the K-quants but has no quantizer for them, so the tests write
their blocks here: a plain round-to-nearest search per sub-block (llama.cpp's own quantizer searches
scales harder; the block format is the same). `gguf.quants.dequantize` is the judge of the layout:
the tests check that it reads these blocks back within one quantization step of the source.

Block layouts (256 values, QK_K), as ggml-common.h defines them:
  Q4_K: d f16, dmin f16, scales[12] (8 six-bit scales and mins), qs[128] (4-bit)        -> 144 bytes
  Q5_K: d f16, dmin f16, scales[12], qh[32] (fifth bits), qs[128]                        -> 176 bytes
  Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16               -> 210 bytes
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """`x` [rows, cols] (cols a multiple of 256) as raw blocks: uint8 [rows, cols // 256 * block bytes]."""
    rows, cols = x.shape
    assert cols % QK_K == 0, f"K-quant rows need a multiple of {QK_K} values; got {cols}"
    blocks = x.astype(np.float32).reshape(-1, QK_K)
    packed = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}[qtype](blocks)
    return packed.reshape(rows, -1)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _scale_min_blocks(blocks: np.ndarray, levels: int):
    """Per 32-value sub-block x ~ d*sc*q - dmin*m with q in [0, levels]: (d, dmin f16 [n], sc, m uint8 [n, 8],
    q uint8 [n, 256])."""
    sub = blocks.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # [n, 8]; the offset only ever subtracts
    step = (sub.max(-1) - lo) / levels
    d = _f16(step.max(-1) / 63)  # [n]
    dmin = _f16(-lo.min(-1) / 63)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, d32, out=np.zeros_like(step), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    scale = (d32 * sc)[..., None]  # [n, 8, 1]
    offset = (dmin32 * m)[..., None]
    q = np.divide(sub + offset, scale, out=np.zeros_like(sub), where=scale > 0)
    q = np.clip(np.round(q), 0, levels).astype(np.uint8).reshape(-1, QK_K)
    return d, dmin, sc, m, q


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins into 12 bytes (get_scale_min_k4's layout)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 256] 4-bit values -> [n, 128]: byte 32*j + l holds sub-block 2j (low) and 2j + 1 (high)."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_blocks(blocks, 15)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_scales(sc, m),
                           _nibbles(q)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_blocks(blocks, 31)
    high = (q >> 4).reshape(-1, 8, 32)  # bit s of qh[l] is the fifth bit of sub-block s, value l
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_scales(sc, m), qh,
                           _nibbles(q & 0xF)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    amax = np.abs(sub).max(-1)  # [n, 16]
    step = amax / 31
    d = _f16(step.max(-1) / 127)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, d32, out=np.zeros_like(step), where=d32 > 0)), 0, 127).astype(np.int8)
    scale = (d32 * sc)[..., None]
    q = np.divide(sub, scale, out=np.zeros_like(sub), where=scale > 0)
    q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    low, high = (q & 0xF).reshape(-1, 2, 2, 64), (q >> 4).reshape(-1, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)  # byte 64c + k: values 128c + k, 128c + 64 + k
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)
