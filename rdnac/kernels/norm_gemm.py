"""RMSNorm inside the GEMM that reads it: the IR op `rms_norm_linear` (built by `fuse_norm_linear`).

    z [, h] = rms_norm_linear(x, (residual), norm_w, W, (bias); eps, unit_offset, has_residual, act)
            = linear(rms_norm(x (+ residual), norm_w), W, bias)      act ""
              linear_gated_act(rms_norm(...), W, bias, act)         act "silu" | "gelu" | "gelu_tanh"

Decode (a config without "norm"; every M bucket <= 16): one launch, the GEMM's
own kernel with its norm prologue (`gemm.NormPrologue`): each program computes
rstd of its rows from the whole rows of x (+ residual), then builds every A
tile as the norm kernel rounds it (h = x + residual, h * rstd, norm_w * that),
and the programs of the first column tile store h. Every form of the GEMM
config takes the prologue: `gemm.linear`'s tiles with or without split-K or
SELF_REDUCE, and the gated node's fused, WIDE and UNFUSED forms.

Prefill (a config with "norm", the rms_norm config; M > 16): `rms_norm.rms_norm`
then the GEMM, two launches as without the fusion (the GEMM is compute-bound
there and the norm one memory pass over [M, K]).

The configs are the GEMM family's (`gemm` or `gemm_gated`, the same problem as
the unfused node, so tuned tables apply); `with_norm_configs` adds the prefill
norm config. rstd's float32 sum runs in another order than the norm kernel's,
so z may differ from the unfused pair's in the last bit; h is the same bits.
"""

from __future__ import annotations

import torch

from rdnac.kernels import gemm, gemm_gated, rms_norm
from rdnac.kernels.launch import Launcher


def _split_inputs(inputs: tuple[torch.Tensor, ...], has_residual: bool):
    """(x, residual | None, norm_w, weight, bias | None) from the node's inputs."""
    x, rest = inputs[0], list(inputs[1:])
    residual = rest.pop(0) if has_residual else None
    norm_w, weight = rest[0], rest[1]
    bias = rest[2] if len(rest) == 3 else None
    return x, residual, norm_w, weight, bias


def _check(x, residual, norm_w, weight) -> None:
    K = x.shape[1]
    assert x.dim() == 2 and x.stride(1) == 1, f"rms_norm_linear: x must be [M, K] with unit stride along K; got {tuple(x.shape)}"
    assert tuple(norm_w.shape) == (K,) and norm_w.dtype == x.dtype, (
        f"rms_norm_linear: the norm weight must be [{K}] {x.dtype}; got {tuple(norm_w.shape)} {norm_w.dtype}")
    assert norm_w.is_contiguous(), "rms_norm_linear: the norm weight must be contiguous"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1, (
            f"rms_norm_linear: residual must be {tuple(x.shape)} {x.dtype} with unit stride; "
            f"got {tuple(residual.shape)} {residual.dtype}")
    gemm._check_operands("rms_norm_linear", x, weight)


def rms_norm_linear(*inputs: torch.Tensor, eps: float, has_residual: bool, act: str = "", unit_offset: bool = False,
                    config: dict, launcher: Launcher):
    """x [M, K], (residual [M, K]), norm_w [K], weight [N, K] (gated: [2I, K]), (bias) -> z [M, N or I],
    and h = x + residual [M, K] with a residual."""
    x, residual, norm_w, weight, bias = _split_inputs(inputs, has_residual)
    _check(x, residual, norm_w, weight)
    if "norm" in config:  # prefill: the norm kernel, then the GEMM
        gemm_config = {k: v for k, v in config.items() if k != "norm"}
        out = rms_norm.rms_norm(x, *([residual] if has_residual else []), norm_w, eps=eps, unit_offset=unit_offset,
                                config=config["norm"], launcher=launcher)
        y, h = out if has_residual else (out, None)
        if act:
            z = gemm_gated.linear_gated_act(y, weight, bias, act=act, config=gemm_config, launcher=launcher)
        else:
            z = gemm.linear(y, weight, bias, config=gemm_config, launcher=launcher)
        return (z, h) if has_residual else z
    M, K = x.shape
    h = torch.empty((M, K), dtype=x.dtype, device=x.device) if has_residual else None  # [M, K]
    norm = gemm.NormPrologue(norm_w, eps, unit_offset, residual, h)
    if act:
        z = gemm_gated.launch_gated(x, weight, bias, act, config=config, launcher=launcher, norm=norm)  # [M, I]
    else:
        N = weight.shape[0]
        assert bias is None or tuple(bias.shape) == (N,), f"rms_norm_linear: bias must be [{N}]; got {tuple(bias.shape)}"
        z = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
        gemm._launch_gemm(x, None, weight, bias, z, M, 0.0, config=config, launcher=launcher, is_gather=False,
                          norm=norm)
    return (z, h) if has_residual else z


def with_norm_configs(ranked: list[tuple[dict, str]], problem: dict) -> list[tuple[dict, str]]:
    """The GEMM family's ranked (config, reason) for a fused node: unchanged at decode (the norm runs in
    the GEMM); above decode sizes each carries the rms_norm family default as config["norm"]."""
    if gemm.m_bucket(problem["M"]) <= gemm.DECODE_MAX_M:
        return [(cfg, f"norm computed in the GEMM (one launch); {why}") for cfg, why in ranked]
    norm_config = rms_norm.default_config({"H": problem["K"], "num_heads": 1})
    return [({**cfg, "norm": norm_config}, f"above decode sizes: rms_norm kernel (family default) then the GEMM, "
             f"two launches (compute-bound); GEMM {why}") for cfg, why in ranked]
