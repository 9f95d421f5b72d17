"""Collectives of sharded GPU plans: the IR ops `all_reduce`, `all_gather`, `shard_ids` and the token-row
ops of the all-to-all expert-parallel form (`reduce_scatter`, `shard_rows`, `all_gather_rows`, `all_to_all`,
`ep_dispatch`, `ep_combine`) (references: rdnac.ir.collectives).

Not Triton kernels: the collectives are torch.distributed calls on the
plan's process group (NCCL on CUDA, RCCL through the same backend on ROCm),
which the runtime sets for the step (`collectives.use_group`); NCCL's
kernels run on the device without a host sync, so a decode step captures
them in its CUDA/HIP graph with the Triton kernels around them
(`reduce_scatter_tensor`, `all_gather_into_tensor` and `all_to_all_single` with
equal splits: sizes come from shapes alone). `shard_ids`, `shard_rows`,
`ep_dispatch` and `ep_combine` are a few torch tensor ops each (no host sync
either; the padding to a multiple of the ranks is a shape, not a value). Over meta tensors (the
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


def reduce_scatter(x: torch.Tensor, *, num_ranks: int, config: dict, launcher) -> torch.Tensor:
    return collectives.reduce_scatter(x, num_ranks=num_ranks)


def shard_rows(x: torch.Tensor, *, num_ranks: int, config: dict, launcher) -> torch.Tensor:
    return collectives.shard_rows(x, num_ranks=num_ranks)


def all_gather_rows(x: torch.Tensor, like: torch.Tensor, *, num_ranks: int, config: dict, launcher) -> torch.Tensor:
    return collectives.all_gather_rows(x, like, num_ranks=num_ranks)


def all_to_all(x: torch.Tensor, *, num_ranks: int, config: dict, launcher) -> torch.Tensor:
    return collectives.all_to_all(x, num_ranks=num_ranks)


def ep_dispatch(x: torch.Tensor, ids: torch.Tensor, *, num_ranks: int, experts_per_rank: int, config: dict,
                launcher):
    return collectives.ep_dispatch(x, ids, num_ranks=num_ranks, experts_per_rank=experts_per_rank)


def ep_combine(back: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *, num_ranks: int,
               experts_per_rank: int, config: dict, launcher) -> torch.Tensor:
    return collectives.ep_combine(back, weights, ids, num_ranks=num_ranks, experts_per_rank=experts_per_rank)


def _problem(attrs: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"N": int(ins[0].shape[-1]) if ins[0].dim() > 1 else 1, "dtype": dtype_name(ins[0])}


FAMILY = KernelFamily(
    "collective", config_space=lambda problem: [CONFIG], default_config=lambda problem: CONFIG,
    ops={"all_reduce": OpKernel(all_reduce, _problem), "all_gather": OpKernel(all_gather, _problem),
         "shard_ids": OpKernel(shard_ids, _problem), "reduce_scatter": OpKernel(reduce_scatter, _problem),
         "shard_rows": OpKernel(shard_rows, _problem), "all_gather_rows": OpKernel(all_gather_rows, _problem),
         "all_to_all": OpKernel(all_to_all, _problem), "ep_dispatch": OpKernel(ep_dispatch, _problem),
         "ep_combine": OpKernel(ep_combine, _problem)})
