"""MXFP4 expert weights as checkpoints store them (frontend; the codec is `rdnac.ir.mxfp4`).

One projection `P` of an experts module (GPT-OSS's `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) is two uint8 tensors:

    P_blocks [E, N, K/32, 16]   e2m1 pairs, low nibble first (32 elements per row of 16 bytes)
    P_scales [E, N, K/32]       e8m0 exponents, one per 32 elements

N is the output features and K the input features: transformers' Mxfp4
integration dequantizes them to [E, N, K] and transposes to its [E, K, N]
parameter. `read_mxfp4` checks names, dtypes, shapes and every scale byte,
and returns blocks [E, N, K/2] (a reshape of the same bytes) and the scales
exactly as stored: the plan carries the checkpoint's bytes.
"""

from __future__ import annotations

import torch

from rdnac.compiler.frontend.builder import GraphBuilder
from rdnac.errors import CheckpointError
from rdnac.ir.mxfp4 import BLOCK

E8M0_NAN = 255


def read_mxfp4(b: GraphBuilder, prefix: str, num_experts: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, N, K/2], scales uint8 [E, N, K/32]) of projection `prefix` (`..._blocks`, `..._scales`)."""
    path = b.checkpoint.path
    blocks_name, scales_name = f"{prefix}_blocks", f"{prefix}_scales"
    if k % BLOCK:
        raise CheckpointError(f"{path}: MXFP4 tensor {b.source(blocks_name)!r} requires its input features (K) to be "
                              f"a multiple of {BLOCK}; got K = {k} from config.json")
    groups = k // BLOCK
    want = {blocks_name: (num_experts, n, groups, 16), scales_name: (num_experts, n, groups)}
    for name, shape in want.items():
        if b.stored(name) is None:
            raise CheckpointError(f"{path}: missing tensor {name!r} (uint8 {list(shape)}), the MXFP4 "
                                  f"{'scales' if name == scales_name else 'blocks'} of {prefix} that "
                                  "quantization_config quant_method mxfp4 requires")
    for name, shape in want.items():
        dtype, stored = b.stored(name)
        if dtype != "uint8":
            raise CheckpointError(f"{path}: tensor {b.source(name)!r} requires dtype uint8 (MXFP4 "
                                  f"{'e8m0 scales' if name == scales_name else 'e2m1 pairs'}); got {dtype}")
        if stored != shape:
            other = blocks_name if name == scales_name else None
            against = (f" to match {b.source(other)!r} {list(b.stored(other)[1])}" if other else
                       f" (E={num_experts}, N={n}, K/32={groups} from config.json)")
            raise CheckpointError(f"{path}: tensor {b.source(name)!r} requires shape {list(shape)}{against}; "
                                  f"got {list(stored)}")
    scales = b.read(scales_name)
    nan = scales == E8M0_NAN
    if nan.any():
        first = [int(i) for i in nan.nonzero()[0]]
        raise CheckpointError(f"{path}: tensor {b.source(scales_name)!r} holds {int(nan.sum())} e8m0 scale "
                              f"byte(s) 255 (NaN), first at {first}; requires finite scales (0..254); "
                              "the checkpoint is corrupt")
    blocks = b.read(blocks_name).reshape(num_experts, n, groups * 16)
    return blocks, scales
