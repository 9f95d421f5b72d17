"""FP8 format rules: e4m3fn -> e4m3fnuz conversion over all 256 byte values, quantization references."""

from __future__ import annotations

import math

import torch

from rdnac.ir.fp8 import FP8_MAX, e4m3fn_to_e4m3fnuz, quantize_rows
from rdnac.ir.ops import linear_fp8


def test_e4m3fn_to_fnuz_all_256_bytes():
    bits = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    fnuz, factor = e4m3fn_to_e4m3fnuz(bits)
    assert fnuz.dtype == torch.float8_e4m3fnuz and factor == 2.0
    for i in range(256):
        ocp, converted = bits[i].float().item(), fnuz[i].float().item() * factor
        if math.isnan(ocp):
            assert math.isnan(converted), i
        else:
            assert converted == ocp, f"byte {i:#04x}: {ocp} became {converted}"


def test_quantize_rows_round_trip_and_zero_rows():
    x = torch.randn(7, 300)
    x[3] = 0
    for fmt in ("e4m3fn", "e4m3fnuz"):
        q, s = quantize_rows(x, fmt)
        assert q.dtype == torch.float8_e4m3fn if fmt == "e4m3fn" else torch.float8_e4m3fnuz
        assert s.shape == (7, 1) and s[3].item() == 1.0
        assert q.float().abs().max().item() <= FP8_MAX[fmt]
        rel = ((q.float() * s - x).abs().max() / x.abs().max()).item()
        assert rel < 0.07, rel


def test_linear_fp8_schemes_close_to_float():
    torch.manual_seed(0)
    x, w = torch.randn(5, 256), torch.randn(200, 256) * 0.05
    exact = x @ w.T
    wq, ws = quantize_rows(w, "e4m3fn")
    for act in ("dynamic_token", "none"):
        y = linear_fp8(x, wq, ws.reshape(-1), weight_scheme="channel", act_scheme=act, fp8_format="e4m3fn")
        assert y.shape == exact.shape and y.dtype == x.dtype
        assert (y - exact).abs().max() < 0.15
