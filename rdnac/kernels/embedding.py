"""Embedding gather: implements the IR op `embedding` (token_ids [T], weight [V, H] -> [T, H]).

One program copies BLOCK_H columns of one token's row, scaled by `scale`
(Gemma multiplies embeddings by sqrt(H)). The product is formed in float32
and rounded once to the weight dtype, as torch does for `bf16_tensor * float`.

Config space: BLOCK_H (a power of two; the grid tiles H, so any value is
correct) and num_warps. Problem keys: {"H": hidden size, "dtype": weight dtype}.
Token ids are not range-checked on the device; the runtime guarantees them. An id of -1 (another
rank's row, in a tensor-parallel plan) gives a zero row, as the IR's `embedding` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_embedding_kernel": ("H", "stride_weight_row", "stride_out_row")}


@triton.jit
def _embedding_kernel(ids_ptr, weight_ptr, out_ptr, H, stride_weight_row, stride_out_row, scale,
                      BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = cols < H
    # int64 row offset: V * H exceeds 2**31 for large vocabularies
    row = tl.load(ids_ptr + token).to(tl.int64)
    # id -1: another rank's row of a vocabulary-parallel table (the IR's shard_ids): a zero row
    values = tl.load(weight_ptr + tl.maximum(row, 0) * stride_weight_row + cols, mask=mask, other=0.0)
    out = values.to(tl.float32) * (scale * (row >= 0).to(tl.float32))  # weights are finite: 0 * w is 0
    tl.store(out_ptr + token.to(tl.int64) * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def embedding(token_ids: torch.Tensor, weight: torch.Tensor, *, scale: float = 1.0,
              config: dict, launcher: Launcher) -> torch.Tensor:
    """token_ids [T] int32/int64 (-1: a zero row), weight [V, H] -> [T, H] in weight's dtype."""
    num_tokens, (_, hidden) = token_ids.shape[0], weight.shape
    assert weight.stride(1) == 1, "embedding weight rows must be contiguous"
    out = torch.empty(num_tokens, hidden, dtype=weight.dtype, device=weight.device)  # [T, H]
    if num_tokens == 0:
        return out
    block_h = config["constexprs"]["BLOCK_H"]
    grid = (num_tokens, cdiv(hidden, block_h))
    launcher.launch(_embedding_kernel, grid,
                    (token_ids, weight, out, hidden, weight.stride(0), out.stride(0), float(scale)),
                    constexprs={"BLOCK_H": block_h},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"H": hidden size}; BLOCK_H from 256 up to the whole row."""
    whole = next_power_of_2(problem["H"])
    blocks = sorted({b for b in (256, 512, 1024, 2048, 4096) if b < whole} | {whole})
    return [{"constexprs": {"BLOCK_H": b}, "num_warps": w, "num_stages": 1}
            for b in blocks for w in (1, 2, 4, 8) if 32 * w <= max(b, 32)]


def default_config(problem: dict) -> dict:
    # a whole row per program: decode batches are small, so fewer larger programs win
    block = min(next_power_of_2(problem["H"]), 4096)
    return {"constexprs": {"BLOCK_H": block}, "num_warps": 4 if block >= 1024 else 2, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


FAMILY = KernelFamily(
    "embedding", config_space=config_space, default_config=default_config,
    ops={"embedding": OpKernel(embedding, lambda a, ins, phase, runtime: {"H": ins[1].shape[1]})})
