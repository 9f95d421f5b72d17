"""Collectives of sharded GPU plans: the IR ops `all_reduce`, `all_gather` and `shard_ids` (rdnac.ir.collectives).

Not Triton kernels: the two collectives are torch.distributed calls on the
plan's process group (NCCL on CUDA, RCCL through the same backend on ROCm),
which the runtime sets for the step (`collectives.use_group`); NCCL's
kernels run on the device without a host sync, so a decode step captures
them in its CUDA/HIP graph with the Triton kernels around them. `shard_ids`
is two elementwise torch ops (no host sync either). Over meta tensors (the
compiler recording a program) there is no group: the references' one-rank
identity, which launches nothing.

Config space: one config (nothing to tune). Problem keys: {"N": row width, "dtype"}.
"""

from __future__ import annotations

import torch

from rdnac.ir import collectives
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name

CONFIG = {"constexprs": {}, "num_warps": 1, "num_stages": 1}


def all_reduce(x: torch.Tensor, *, config: dict, launcher) -> torch.Tensor:
    """x [T, N] -> the sum over the ranks, in x's buffer (x, a row-parallel node's partial sum, has no
    other reader)."""
    return collectives.all_reduce(x, in_place=True)


def all_gather(x: torch.Tensor, *, size: int, config: dict, launcher) -> torch.Tensor:
    """x [R, n] -> [R, size]: the ranks' columns side by side in rank order, truncated to `size`."""
    return collectives.all_gather(x, size=size)


def shard_ids(ids: torch.Tensor, start: torch.Tensor, *, size: int, config: dict, launcher) -> torch.Tensor:
    """ids -> ids - start where in [0, size), else -1 (the rank's rows of a sharded table)."""
    return collectives.shard_ids(ids, start, size=size)


def _problem(attrs: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"N": int(ins[0].shape[-1]) if ins[0].dim() > 1 else 1, "dtype": dtype_name(ins[0])}


FAMILY = KernelFamily(
    "collective", config_space=lambda problem: [CONFIG], default_config=lambda problem: CONFIG,
    ops={"all_reduce": OpKernel(all_reduce, _problem), "all_gather": OpKernel(all_gather, _problem),
         "shard_ids": OpKernel(shard_ids, _problem)})
