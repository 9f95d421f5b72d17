"""Collective ops of tensor- and expert-parallel plans (references, shape rules) and the process group they use.

| op         | inputs                      | outputs                                   |
|------------|-----------------------------|-------------------------------------------|
| all_reduce | x [T, N]                    | [T, N]: the sum of x over the ranks        |
| all_gather | x [R, n] (attr size <= n*W) | [R, size]: every rank's x side by side, rank order, first `size` columns |
| shard_ids  | ids [..] int, start [1] int64 (attr size) | ids - start where 0 <= ids - start < size, else -1 |
| reduce_scatter | x [T, N] (attr num_ranks W) | [ceil(T/W), N]: the rank's rows of the sum over the ranks |
| shard_rows | x [T, N] (attr num_ranks)   | [ceil(T/W), N]: the rank's rows of x (every rank holds x whole) |
| all_gather_rows | x [ceil(T/W), N], like [T] (attr num_ranks) | [T, N]: every rank's rows, rank order |
| all_to_all | x [W*C, N] (attr num_ranks) | [W*C, N]: block s (rows [s*C, (s+1)*C)) is what rank s sent to this rank |
| ep_dispatch | x [Tl, H], ids [Tl, k] int32 (attrs num_ranks, experts_per_rank) | send [W*Tl*k, H],   |
|            |                             | send_ids [W*Tl*k, 1] int32, slot_weights [W*Tl*k, 1] f32 |
| ep_combine | back [W*Tl*k, H], weights [Tl, k], ids [Tl, k] (same attrs) | [Tl, H] |

A sharded plan (`rdnac.compiler.passes.shard`) is one graph that every rank
runs with its own weights: a row-parallel linear's partial sums go through
`all_reduce`, the vocabulary-parallel logits through `all_gather` (`size`
drops the rows that padded the vocabulary to a multiple of the ranks).
`shard_ids` turns global ids into this rank's rows of a sharded table (the
vocabulary of a vocabulary-parallel embedding, the experts of an
expert-parallel MoE); `start` is a per-rank weight, so the graph stays the
same on every rank. An id of another rank's rows becomes -1, which
`embedding` turns into a zero row and `moe_experts` skips.

Token rows (the all-to-all form of expert parallelism, `--ep-dispatch
all-to-all`, rdnac.compiler.passes.shard_dispatch): a step's T token rows
are padded with zero rows to W*ceil(T/W) and rank r holds rows
[r*Tl, (r+1)*Tl), Tl = ceil(T/W). `reduce_scatter` leaves the rank its rows
of a sum (half an all-reduce's traffic), `shard_rows` takes the rank's rows
of a value every rank holds (no traffic), `all_gather_rows` puts the T rows
back on every rank (the padding dropped). `all_to_all` moves fixed-size
blocks: every rank sends C rows to each rank, so sizes never depend on the
data (no host sync; a decode step captures it in its graph).
`ep_dispatch` lays out the rank's routed (token, choice) slots for it at the
worst-case capacity C = Tl*k per destination: slot (d, t, j) holds x[t]
and the expert's id on rank d when the j-th choice of token t is one of rank
d's `experts_per_rank` experts, else a zero row and id -1, so nothing is
ever dropped; `slot_weights` (1.0) lets the receiving rank run `moe_experts`
on the slots as tokens of one choice each (the routing weights stay where
the token is). `ep_combine` reads back each slot from the block of the rank
that computed it and sums a token's k slots times their routing weights in
float32, cast once.

The references call torch.distributed on the group `use_group` set (the
runtime's, or the interpreter's `group` argument); with no group, or a group
of one rank, `all_reduce` and `all_gather` are the identity (a plan compiled
with --tp 1 has none of them). With no group the token-row ops (whose
`num_ranks` fixes their shapes) run as rank 0 of `num_ranks` whose peers
hold zeros: the shapes are the real ones (what the compiler records a GPU
plan's program over, on meta tensors) and a direct computation checks them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rdnac.ir.graph import TensorSpec

OP_NAMES = ("all_reduce", "all_gather", "shard_ids", "reduce_scatter", "shard_rows", "all_gather_rows",
            "all_to_all", "ep_dispatch", "ep_combine")
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


def rank() -> int:
    if _GROUP is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(_GROUP)


def _padded_rows(x: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """x [T, ...] with zero rows appended up to a multiple of num_ranks (contiguous)."""
    pad = -x.shape[0] % num_ranks
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()


def _ranks(num_ranks: int) -> bool:
    """Whether a group runs the op (else: rank 0 of num_ranks whose peers hold zeros)."""
    world = world_size()
    assert world in (1, num_ranks), f"a {num_ranks}-rank op on a group of {world}"
    return _GROUP is not None and world > 1


def reduce_scatter(x: torch.Tensor, *, num_ranks: int) -> torch.Tensor:
    """x [T, N] -> [ceil(T/W), N]: this rank's rows of the sum of x over the ranks (rows padded with zeros)."""
    padded = _padded_rows(x, num_ranks)
    rows = padded.shape[0] // num_ranks
    if not _ranks(num_ranks):
        return padded[:rows]
    import torch.distributed as dist

    out = padded.new_empty(rows, *padded.shape[1:])
    # torch 2.13 names it reduce_scatter_single (reduce_scatter_tensor deprecated); older torch has the old name
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, padded, group=_GROUP)
    return out


def shard_rows(x: torch.Tensor, *, num_ranks: int) -> torch.Tensor:
    """x [T, N] (the same on every rank) -> [ceil(T/W), N]: this rank's rows, zero rows past T."""
    padded = _padded_rows(x, num_ranks)
    rows = padded.shape[0] // num_ranks
    return padded[rank() * rows:(rank() + 1) * rows]


def all_gather_rows(x: torch.Tensor, like: torch.Tensor, *, num_ranks: int) -> torch.Tensor:
    """x [Tl, N] on each rank -> [T, N] (T = like's rows): the ranks' rows in rank order, padding dropped."""
    num_tokens = like.shape[0]
    x = x.contiguous()
    if not _ranks(num_ranks):
        return torch.cat([x, x.new_zeros((num_ranks - 1) * x.shape[0], *x.shape[1:])])[:num_tokens]
    import torch.distributed as dist

    out = x.new_empty(num_ranks * x.shape[0], *x.shape[1:])
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=_GROUP)  # as above
    return out[:num_tokens]


def all_to_all(x: torch.Tensor, *, num_ranks: int) -> torch.Tensor:
    """x [W*C, ...] -> [W*C, ...]: rows [d*C, (d+1)*C) go to rank d; block s of the result came from rank s."""
    x = x.contiguous()
    if not _ranks(num_ranks):
        block = x.shape[0] // num_ranks
        return torch.cat([x[:block], x.new_zeros(x.shape[0] - block, *x.shape[1:])])
    import torch.distributed as dist

    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=_GROUP)
    return out


def ep_dispatch(x: torch.Tensor, ids: torch.Tensor, *, num_ranks: int, experts_per_rank: int):
    """(send [W*Tl*k, H], send_ids [W*Tl*k, 1] int32, slot_weights [W*Tl*k, 1] float32): slot (d, t, j) is
    x[t] and ids[t, j]'s id among rank d's experts when rank d holds it, else a zero row and -1."""
    tokens, top_k = ids.shape
    dest = torch.arange(num_ranks, device=ids.device).view(num_ranks, 1, 1)
    local = ids.long().unsqueeze(0) - dest * experts_per_rank  # [W, Tl, k]
    mine = (local >= 0) & (local < experts_per_rank)
    send_ids = torch.where(mine, local, torch.full_like(local, -1)).to(torch.int32).reshape(-1, 1)
    rows = x.unsqueeze(0).unsqueeze(2).expand(num_ranks, tokens, top_k, x.shape[1])
    send = torch.where(mine.unsqueeze(-1), rows, torch.zeros_like(rows)).reshape(-1, x.shape[1])
    return send, send_ids, torch.ones(send_ids.shape, dtype=torch.float32, device=x.device)


def ep_combine(back: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *, num_ranks: int,
               experts_per_rank: int) -> torch.Tensor:
    """[Tl, H]: sum over j of weights[t, j] * the slot (t, j) the owner of expert ids[t, j] sent back."""
    tokens, top_k = ids.shape
    owner = (ids.long() // experts_per_rank).clamp(0, num_ranks - 1)  # [Tl, k]
    blocks = back.view(num_ranks, tokens, top_k, back.shape[1])
    picked = blocks.gather(0, owner.view(1, tokens, top_k, 1).expand(1, tokens, top_k, back.shape[1]))[0]
    out = torch.zeros(tokens, back.shape[1], dtype=torch.float32, device=back.device)
    for j in range(top_k):  # choice order, in float32 (moe_experts' sum)
        out += picked[:, j].float() * weights[:, j, None].float()
    return out.to(back.dtype)


def _rows(num_tokens, num_ranks: int):
    """ceil(T/W) rows per rank: an int, or a symbol for a symbolic T."""
    return -(-num_tokens // num_ranks) if isinstance(num_tokens, int) else f"ceil({num_tokens}/{num_ranks})"


def rows_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    """reduce_scatter, shard_rows: [ceil(T/W), N]."""
    return [TensorSpec(ins[0].dtype, (_rows(ins[0].shape[0], attrs["num_ranks"]), *ins[0].shape[1:]))]


def all_gather_rows_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[1].shape[0], *ins[0].shape[1:]))]


def ep_dispatch_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    num_ranks, (tokens, top_k) = attrs["num_ranks"], ins[1].shape
    slots = num_ranks * tokens * top_k if isinstance(tokens, int) else f"{num_ranks * top_k}*{tokens}"
    return [TensorSpec(ins[0].dtype, (slots, ins[0].shape[1])), TensorSpec("int32", (slots, 1)),
            TensorSpec("float32", (slots, 1))]


def ep_combine_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[1].shape[0], ins[0].shape[1]))]


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
    if op in ("reduce_scatter", "shard_rows", "all_gather_rows", "all_to_all", "ep_dispatch", "ep_combine"):
        expect(isinstance(attrs["num_ranks"], int) and attrs["num_ranks"] > 1, "num_ranks must be an int > 1")
        expect(len(ins[0].shape) == 2, f"{op} takes rows x [rows, N]")
    if op in ("ep_dispatch", "ep_combine"):
        expect(isinstance(attrs["experts_per_rank"], int) and attrs["experts_per_rank"] > 0,
               "experts_per_rank must be a positive int")
        expect(ins[-1].dtype == "int32" and len(ins[-1].shape) == 2, f"{op} takes ids [Tl, k] int32 last")


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}
# op -> (what each rank sends of the op's rows, as a fraction of them, W ranks; the formula inspect prints)
_SHARE = {"all_reduce": (lambda w: 2 * (w - 1) / w, "2(W-1)/W x row (ring)"),
          "all_gather": (lambda w: (w - 1) / w, "(W-1)/W x logits row"),
          "reduce_scatter": (lambda w: (w - 1) / w, "(W-1)/W x row"),
          "all_gather_rows": (lambda w: (w - 1) / w, "(W-1)/W x row"),
          "all_to_all": (lambda w: (w - 1) / w, "(W-1)/W x {rows} slot rows (fixed capacity)")}


def summary(graph, num_ranks: int) -> list[dict]:
    """Per collective node (the ops that move bytes between ranks), in graph order: where it sits (the node
    it reads), and the bytes it moves per token (per requested logits row for all_gather): `payload` (the
    rows of a token it carries: one row of the hidden size, or an all_to_all's k slots) and `per_rank`
    (what each rank sends, `formula`: on a ring 2(W-1)/W of the payload for an all-reduce, (W-1)/W for
    the others). For `rdnac inspect`. Shapes are inferred at a step of 64*W tokens, so that an all_to_all's
    rows per token (its slots) come out exact."""
    from rdnac.ir.ops import OPS

    sizes = {"T": 64 * num_ranks}  # the other symbols (sequences, blocks) do not reach a collective's rows
    specs: dict[str, TensorSpec] = {k: TensorSpec(v.dtype, tuple(sizes.get(d, 1) if isinstance(d, str) else d
                                                                  for d in v.shape)) for k, v in graph.inputs.items()}
    specs.update((k, TensorSpec(w.dtype, w.shape)) for k, w in graph.weights.items())
    producer = {}
    rows = []
    for node in graph.nodes:
        ins = [specs[n] for n in node.inputs]
        outs = OPS[node.op].infer(node.attrs, ins)
        specs.update(zip(node.outputs, outs))
        producer.update((o, node) for o in node.outputs)
        if node.op not in _SHARE:
            continue
        width, dtype = int(ins[0].shape[-1]), ins[0].dtype
        per_token = 1 if node.op != "all_to_all" else ins[0].shape[0] // sizes["T"]  # slots per token
        payload = per_token * width * _ITEMSIZE.get(dtype, 4)
        share, formula = _SHARE[node.op]
        src = producer.get(node.inputs[0])
        rows.append({"node": node.name, "op": node.op, "after": f"{src.name} ({src.op})" if src else node.inputs[0],
                     "dtype": dtype, "width": width, "rows": per_token, "per": "logits row" if node.op == "all_gather"
                     else "token", "payload_bytes": payload, "per_rank_bytes": int(payload * share(num_ranks)),
                     "formula": formula.format(rows=per_token)})
    return rows
