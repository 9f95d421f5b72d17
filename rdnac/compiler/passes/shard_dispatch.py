"""The all-to-all form of expert parallelism (`--ep --ep-dispatch all-to-all`), for the shard pass (shard.py,
whose `Sharder` calls `all_to_all_form` once the graph is sharded in the all-reduce form).

A MoE layer of the all-reduce form (every rank routes every token, runs its
own experts on them, and the partial sums are all-reduced):

    o = all_reduce(o_proj.partial)              # attention's row-parallel output
    y, h1 = rms_norm(o, res, w)                 # h1 = o + res, the residual after attention
    ids = shard_ids(route(router(y)))           # -1: another rank's expert
    m = all_reduce(moe_experts(y, ..., ids))
    y2, h2 = rms_norm(m, h1, w2)                # the next norm; h2 = m + h1

becomes, with Tl = ceil(T/W) token rows per rank (rdnac.ir.collectives):

    o_s = reduce_scatter(o_proj.partial)        # the rank's rows of the sum: half an all-reduce
    y_s, h1_s = rms_norm(o_s, shard_rows(res), w)   # the rank's rows of res: no traffic (or the
                                                # previous all-to-all layer's h2_s, already the rank's)
    ws, ids = route(router(y_s))                # the rank routes its own tokens
    send, send_ids, ones = ep_dispatch(y_s, ids)   # W*Tl*k slots, Tl*k per destination (worst case)
    out = moe_experts(all_to_all(send), ones, all_to_all(send_ids), ...)   # the rank's experts
    m_s = ep_combine(all_to_all(out), ws, ids)  # each slot back from its expert's rank, weighted sum
    h2 = all_gather_rows(m_s + h1_s)            # every token on every rank for the next layer
    y2 = rms_norm(h2, w2)

Every row op (norm, router, route, the expert MLP of a slot, the residual
add) computes a token's row exactly as one rank does, so the result is the
tp=1 plan's within float rounding of the sums' order. The (at most W-1) zero
rows that pad T to a multiple of W are normalized, routed and computed like
tokens (their rows are finite: rms_norm of zeros is zeros) and dropped by
the gather. The next norm loses
its residual input: the add that was fused into it runs on the rank's rows
before the gather, so one all_gather moves the residual stream (h2), not
two values.

What it moves per token and rank, H the hidden size, k the top-k, W ranks,
b the bytes of an element: reduce_scatter and all_gather_rows (W-1)/W*H*b
each (an all-reduce's 2(W-1)/W*H*b together); each all_to_all of rows
(W-1)/W*k*H*b at the fixed worst-case capacity (every slot a full row,
sent or not), twice, plus the ids' (W-1)/W*k*4. So with attention
tensor-parallel this form moves about k+1 times the all-reduce form's bytes;
its gains are elsewhere (each rank routes and normalizes only its Tl tokens,
and only routed slots reach an expert), and a capacity below the worst case
(dropped tokens) or data-parallel attention would make its traffic the
smaller one. That is why all-reduce stays the default and this form is a
choice (recorded in the decision log with its bytes).

Refused, one line each: a MoE layer whose norm, router and experts do not
sit as above (a shared expert reading the same input, a residual read
elsewhere), with the all-reduce form as the way out.
"""

from __future__ import annotations

from rdnac.ir.graph import Node
from rdnac.ir.moe import EXPERT_OPS

NAME = "shard"
_NORMS = ("rms_norm", "rms_norm_quant")  # the next layer's input norm (or the final norm), residual last


def all_to_all_form(s) -> None:
    """Rewrite every MoE layer of the sharded graph (s.graph, all-reduce form, nodes final) as above."""
    g, n = s.graph, s.n
    sliced: dict[str, str] = {}  # a residual every rank holds whole -> the value holding the rank's rows of it
    for experts in [x for x in g.nodes if x.op in EXPERT_OPS]:
        producer = {o: node for node in g.nodes for o in node.outputs}
        readers: dict[str, list[Node]] = {}
        for node in g.nodes:
            for name in node.inputs:
                readers.setdefault(name, []).append(node)
        post, reduce, router, route, shard_ids, gather_sum, norm = _match(s, experts, producer, readers)
        num_ranks = {"num_ranks": n}
        res, h1 = post.inputs[1], post.outputs[1]
        h2 = norm.outputs[-1]
        local = g.weights[experts.inputs[3]].shape[0]
        # attention's partial sums: the rank's rows only
        reduce.op, reduce.attrs = "reduce_scatter", dict(num_ranks)
        reduce.name = reduce.name.replace(".all_reduce", ".reduce_scatter")
        reduce.outputs = [f"{reduce.outputs[0]}.rows"]
        new_before_post = []
        if res not in sliced:
            sliced[res] = f"{res}.rows"
            new_before_post.append(Node(f"{post.name}.shard_rows", "shard_rows", [res], [sliced[res]], dict(num_ranks)))
        post.inputs[:2] = [reduce.outputs[0], sliced[res]]
        y = post.outputs[0]
        post.outputs = [f"{y}.rows", f"{h1}.rows"]
        router.inputs[0] = post.outputs[0]
        weights, ids = route.outputs
        x = experts.name
        dispatch = [Node(f"{x}.dispatch", "ep_dispatch", [post.outputs[0], ids],
                         [f"{x}.send", f"{x}.send_ids", f"{x}.slot_weights"],
                         {**num_ranks, "experts_per_rank": local}),
                    Node(f"{x}.all_to_all", "all_to_all", [f"{x}.send"], [f"{x}.recv"], dict(num_ranks)),
                    Node(f"{x}.all_to_all_ids", "all_to_all", [f"{x}.send_ids"], [f"{x}.recv_ids"], dict(num_ranks))]
        experts.inputs[:3] = [f"{x}.recv", f"{x}.slot_weights", f"{x}.recv_ids"]
        experts.outputs = [f"{x}.slots"]
        combine = [Node(f"{x}.all_to_all_back", "all_to_all", [f"{x}.slots"], [f"{x}.back"], dict(num_ranks)),
                   Node(f"{x}.combine", "ep_combine", [f"{x}.back", weights, ids], [f"{x}.rows"],
                        {**num_ranks, "experts_per_rank": local}),
                   Node(f"{x}.residual", "add", [f"{x}.rows", post.outputs[1]], [f"{h2}.rows"]),
                   Node(f"{x}.all_gather", "all_gather_rows", [f"{h2}.rows", "positions"], [h2], dict(num_ranks))]
        sliced[h2] = f"{h2}.rows"
        norm.inputs = [h2, norm.inputs[2]]
        norm.outputs = norm.outputs[:-1]
        nodes = []
        for node in g.nodes:
            if node is post:
                nodes.extend(new_before_post)
            if node is shard_ids:
                nodes.extend(dispatch)
            elif node is gather_sum:
                nodes.extend(combine)
            else:
                nodes.append(node)
        g.nodes = nodes
        norm_weight = g.weights[post.inputs[2]]  # [H], the compute dtype
        row_bytes = norm_weight.shape[0] * {"float32": 4}.get(norm_weight.dtype, 2)
        k = route.attrs["top_k"]
        s.state.decide(NAME, x, f"all-to-all dispatch: {reduce.name} leaves each rank its ceil(T/{n}) token "
                       f"rows, which it routes; ep_dispatch + all_to_all send {k} slots per token to the ranks "
                       f"holding their experts (capacity Tl*{k} per rank), all_to_all back, ep_combine, residual "
                       "add, all_gather_rows of the residual stream",
                       f"--ep-dispatch all-to-all; per token each rank sends {_form_bytes(n, k, row_bytes)} bytes "
                       f"in this layer against {2 * (n - 1) * row_bytes // n} in the all-reduce form (fixed "
                       "worst-case capacity: no token dropped, no data-dependent sizes)")
    _drop_unread(s)


def _match(s, experts: Node, producer: dict, readers: dict):
    """The nodes of one MoE layer of the all-reduce form, or a refusal naming what differs."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            s.fail(experts, f"requires, for --ep-dispatch all-to-all, {what}; compile with --ep-dispatch "
                            "all-reduce (the default) for this model")

    post = producer.get(experts.inputs[0])
    need(post is not None and post.op == "rms_norm" and len(post.inputs) == 3 and len(post.outputs) == 2,
         "its input from an rms_norm that adds the residual (x, residual, weight)")
    reduce = producer.get(post.inputs[0])
    need(reduce is not None and reduce.op == "all_reduce" and len(readers[reduce.outputs[0]]) == 1,
         f"{post.name}'s input from a row-parallel all_reduce that only it reads")
    shard_ids = producer.get(experts.inputs[2])
    need(shard_ids is not None and shard_ids.op == "shard_ids", "its ids from shard_ids (--ep)")
    route = producer.get(shard_ids.inputs[0])
    need(route is not None and route.op == "moe_route" and experts.inputs[1] == route.outputs[0],
         "its weights and ids from one moe_route")
    router = producer.get(route.inputs[0])
    need(router is not None and router.op == "linear" and router.inputs[0] == post.outputs[0],
         f"its router a linear of {post.outputs[0]!r}")
    others = sorted(f"{r.name} ({r.op})" for r in readers[post.outputs[0]] if r not in (router, experts))
    need(not others, f"{post.outputs[0]!r} read by the router and the experts only (a shared expert has no place "
                     f"in this form yet); got it read by {others} too")
    need(all(r in (shard_ids, router) for r in readers[route.outputs[1]]) and
         all(r is experts for r in readers[route.outputs[0]]), f"{route.name}'s outputs read by the experts only")
    gather_sum = next(iter(readers.get(experts.outputs[0], [])), None)
    need(gather_sum is not None and gather_sum.op == "all_reduce", "its partial sum all-reduced")
    nexts = readers.get(gather_sum.outputs[0], [])
    norm = nexts[0] if len(nexts) == 1 else None
    need(norm is not None and norm.op in _NORMS and norm.inputs[0] == gather_sum.outputs[0] and len(norm.inputs) == 3
         and norm.inputs[1] == post.outputs[1], f"its sum read by one norm that adds the residual {post.outputs[1]!r}")
    need(len(readers[post.outputs[1]]) == 1, f"the residual {post.outputs[1]!r} read by that norm only")
    return post, reduce, router, route, shard_ids, gather_sum, norm


def _form_bytes(n: int, top_k: int, row_bytes: int) -> int:
    """Per token and rank: reduce_scatter + all_gather_rows ((W-1)/W rows each), two all_to_alls of k rows and
    one of k int32 ids ((W-1)/W of each)."""
    return int((n - 1) / n * (2 * row_bytes + 2 * top_k * row_bytes + top_k * 4))


def _drop_unread(s) -> None:
    """The expert start weight (shard_ids') once no node reads it."""
    from rdnac.compiler.passes.shard import EXPERT_START

    if any(EXPERT_START in node.inputs for node in s.graph.nodes):
        return
    s.graph.weights.pop(EXPERT_START, None)
    s.how.pop(EXPERT_START, None)
    for weights in s.ranks:
        weights.pop(EXPERT_START, None)
