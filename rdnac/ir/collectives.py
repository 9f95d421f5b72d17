"""Collective ops of tensor- and expert-parallel plans (references, shape rules) and the process group they use.

| op         | inputs                      | outputs                                   |
|------------|-----------------------------|-------------------------------------------|
| all_reduce | x [T, N]                    | [T, N]: the sum of x over the ranks        |
| all_gather | x [R, n] (attr size <= n*W) | [R, size]: every rank's x side by side, rank order, first `size` columns |
| shard_ids  | ids [..] int, start [1] int64 (attr size) | ids - start where 0 <= ids - start < size, else -1 |

A sharded plan (`rdnac.compiler.passes.shard`) is one graph that every rank
runs with its own weights: a row-parallel linear's partial sums go through
`all_reduce`, the vocabulary-parallel logits through `all_gather` (`size`
drops the rows that padded the vocabulary to a multiple of the ranks).
`shard_ids` turns global ids into this rank's rows of a sharded table (the
vocabulary of a vocabulary-parallel embedding, the experts of an
expert-parallel MoE); `start` is a per-rank weight, so the graph stays the
same on every rank. An id of another rank's rows becomes -1, which
`embedding` turns into a zero row and `moe_experts` skips.

The references call torch.distributed on the group `use_group` set (the
runtime's, or the interpreter's `group` argument); with no group, or a group
of one rank, `all_reduce` and `all_gather` are the identity (a plan compiled
with --tp 1 has none of them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rdnac.ir.graph import TensorSpec

OP_NAMES = ("all_reduce", "all_gather", "shard_ids")
_GROUP = None  # the torch.distributed process group the references use (None: one rank)


@contextmanager
def use_group(group):
    """Run collectives on `group` (a torch.distributed ProcessGroup, or None for one rank) inside the block."""
    global _GROUP
    previous, _GROUP = _GROUP, group
    try:
        yield
    finally:
        _GROUP = previous


def world_size() -> int:
    if _GROUP is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(_GROUP)


def all_reduce(x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The sum of x over the group's ranks: a new tensor (x is a node's output, possibly a view), or with
    `in_place` x's own buffer when x is contiguous (the GPU kernel's form: the shard pass makes every
    all_reduce the only reader of its input, `<out>.partial`, so the copy would be one more launch)."""
    if world_size() == 1:
        return x
    import torch.distributed as dist

    out = x if in_place and x.is_contiguous() else x.contiguous().clone()
    dist.all_reduce(out, group=_GROUP)
    return out


def all_gather(x: torch.Tensor, *, size: int) -> torch.Tensor:
    """[R, n] on each rank -> [R, size]: the ranks' x concatenated along columns in rank order, truncated."""
    n = world_size()
    if n == 1:
        return x[:, :size]
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=_GROUP)
    return torch.cat(parts, dim=1)[:, :size]


def shard_ids(ids: torch.Tensor, start: torch.Tensor, *, size: int) -> torch.Tensor:
    """ids - start where that is in [0, size) (this rank's rows), else -1; ids' dtype is kept."""
    local = ids - start.to(ids.dtype)
    return torch.where((local >= 0) & (local < size), local, torch.full_like(local, -1))


def all_reduce_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0]]


def all_gather_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], attrs["size"]))]


def shard_ids_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0]]


def check(op: str, attrs: dict, ins: list[TensorSpec], expect) -> None:
    """verify's checks of a collective node."""
    if op == "all_gather":
        expect(len(ins[0].shape) == 2 and isinstance(attrs["size"], int) and attrs["size"] > 0,
               "all_gather takes x [R, n] and a positive int size")
    elif op == "shard_ids":
        expect(ins[0].dtype.startswith("int") and ins[1].dtype == "int64" and tuple(ins[1].shape) == (1,),
               "shard_ids takes int ids and an int64 start [1]")
        expect(isinstance(attrs["size"], int) and attrs["size"] > 0, "size must be a positive int")


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def summary(graph, num_ranks: int) -> list[dict]:
    """Per all_reduce / all_gather node, in graph order: where it sits (the node it reads), and the bytes it
    moves per token (per requested logits row for all_gather): `payload` (the tensor row one rank holds
    after it) and `per_rank` (what each rank sends on a ring: 2(W-1)/W of the row for an all-reduce,
    (W-1)/W for an all-gather). For `rdnac inspect`."""
    from rdnac.ir.ops import OPS

    specs: dict[str, TensorSpec] = dict(graph.inputs)
    specs.update((k, TensorSpec(w.dtype, w.shape)) for k, w in graph.weights.items())
    producer = {}
    rows = []
    for node in graph.nodes:
        outs = OPS[node.op].infer(node.attrs, [specs[n] for n in node.inputs])
        specs.update(zip(node.outputs, outs))
        producer.update((o, node) for o in node.outputs)
        if node.op not in ("all_reduce", "all_gather"):
            continue
        out = outs[0]
        payload = int(out.shape[-1]) * _ITEMSIZE.get(out.dtype, 4)
        share = (2 if node.op == "all_reduce" else 1) * (num_ranks - 1) / num_ranks
        src = producer.get(node.inputs[0])
        rows.append({"node": node.name, "op": node.op, "after": f"{src.name} ({src.op})" if src else node.inputs[0],
                     "dtype": out.dtype, "width": int(out.shape[-1]), "per": "logits row" if node.op == "all_gather"
                     else "token", "payload_bytes": payload, "per_rank_bytes": int(payload * share)})
    return rows
