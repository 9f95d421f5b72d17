"""Mixture-of-experts ops: routing and the routed expert MLP (references and shape rules).

| op                | inputs                                                          | outputs            |
|-------------------|-----------------------------------------------------------------|--------------------|
| moe_route         | router_logits [T, E], (correction_bias [E] f32)                 | weights [T, k] f32, ids [T, k] int32 |
| moe_experts       | x [T, H], weights [T, k], ids [T, k], w13 [E, 2I, H], w2 [E, H, I], | [T, H]         |
|                   | (b13 [E, 2I], b2 [E, H])                                        |                    |
| moe_experts_mxfp4 | x, weights, ids, w13_blocks u8 [E, 2I, H/2], w13_scales u8 [E, 2I, H/32], | [T, H]   |
|                   | w2_blocks u8 [E, H, I/2], w2_scales u8 [E, H, I/32], (b13, b2)  |                    |
| moe_experts_fp8_block | x, weights, ids, w13 fp8 [E, 2I, H], w13_scale f32 [E, 2*ceil(I/128), ceil(H/128)], | [T, H] |
|                   | w2 fp8 [E, H, I], w2_scale f32 [E, ceil(H/128), ceil(I/128)]    |                    |

The router itself is a `linear` node (with its bias where the model has
one); `moe_route` turns its logits into each token's k experts and their
weights. `scoring`:

- "softmax_topk": softmax over all E experts in float32, then the k largest
  (Qwen3-MoE, Mixtral); `renormalize` divides them by their sum
  (`norm_topk_prob`).
- "topk_softmax": the k largest logits, then a softmax over those k
  (GPT-OSS); already normalized.

- "sigmoid_group_topk" (DeepSeek-V3/R1): scores = sigmoid(logits); the
  choice adds `correction_bias` (e_score_correction_bias, a second input;
  for selection only); experts form `n_group` groups of E/n_group, each
  group scored by the sum of its two best choices, and the k experts are
  the best choices within the `topk_group` best groups; their weights are
  the unbiased scores, divided by their sum (+1e-20) when `renormalize`.
- "softmax_group_topk" (DeepSeek-V2 `group_limited_greedy`): softmax over
  all E, each group scored by its best expert, experts outside the
  `topk_group` best groups set to 0, then the k largest.

Every scoring then multiplies the weights by `routed_scaling_factor`
(default 1.0; DeepSeek's). Every scoring has a GPU kernel (rdnac/kernels/moe_route.py).

Exact ties pick the lower expert id (a stable sort: torch.topk does not
guarantee it, and on cpu picks higher ids among equal values); ids are int32.

`moe_experts` is, per token t, sum over j of weights[t, j] * expert
ids[t, j] applied to x[t], where expert e is down(act(gate, up)) with
gate/up = rows [0, I) / [I, 2I) of x @ w13[e]^T (+ b13[e]) and down =
w2[e] (+ b2[e]): weights are [N, K] like `linear`'s. A checkpoint whose
gate and up columns interleave (GPT-OSS) is de-interleaved by the frontend,
once, so every kernel sees one layout. `act`:

- "silu", "gelu", "gelu_tanh": act(gate) * up.
- "swiglu_oai" (GPT-OSS, attrs `alpha`, `limit`): gate clamped to <= limit,
  up to [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1).

An id of -1 (an expert placed on another rank, `rdnac.ir.collectives`)
contributes nothing. Experts compute in float32 and the sum is cast to x's dtype once. The
`_mxfp4` form is the same op with both expert weights in MXFP4
(`rdnac.ir.mxfp4`): dequantized exactly, then as above. The `_fp8_block` form
keeps FP8 experts with 128x128 block scales (DeepSeek-V3/R1's native
checkpoints; attrs fp8_format, act_scheme, block_size): weights dequantized,
activations of both projections quantized per token and 128 columns
(act_scheme "dynamic_group", as `linear_fp8`) or kept ("none", a16w8), then
as above (`moe_experts_fp8_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdnac.ir import fp8, mxfp4
from rdnac.ir.graph import TensorSpec

SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid_group_topk", "softmax_group_topk")
GROUP_SCORINGS = ("sigmoid_group_topk", "softmax_group_topk")  # DeepSeek's: attrs n_group, topk_group
ACTS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
EXPERT_OPS = ("moe_experts", "moe_experts_mxfp4", "moe_experts_fp8_block")  # the routed expert MLP's forms


def moe_route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None, *, top_k: int, scoring: str,
              renormalize: bool = False, n_group: int = 1, topk_group: int = 1,
              routed_scaling_factor: float = 1.0):
    """(weights [T, k] float32, ids [T, k] int32) of each token's k experts."""
    logits = router_logits.float()
    if scoring in GROUP_SCORINGS:
        weights, ids = _group_limited(logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group)
    elif scoring == "softmax_topk":
        weights, ids = _top_k(torch.softmax(logits, dim=-1), top_k)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    elif scoring == "topk_softmax":
        values, ids = _top_k(logits, top_k)
        weights = torch.softmax(values, dim=-1)
    else:
        raise ValueError(f"unknown moe scoring {scoring!r}")
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def _top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row, largest first, exact ties in increasing id order (what the kernel does)."""
    ordered = torch.sort(values, dim=-1, descending=True, stable=True)
    return ordered.values[..., :k], ordered.indices[..., :k]


def _group_limited(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str,
                   renormalize: bool, n_group: int, topk_group: int):
    num_tokens, num_experts = logits.shape
    grouped = (num_tokens, n_group, num_experts // n_group)
    if scoring == "sigmoid_group_topk":
        scores = logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        group_scores = choice.view(grouped).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        fill = float("-inf")
    else:
        scores = choice = torch.softmax(logits, dim=-1)
        group_scores = choice.view(grouped).max(dim=-1).values
        fill = 0.0
    groups = torch.topk(group_scores, topk_group, dim=-1)[1]
    in_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    in_group = in_group[:, :, None].expand(grouped).reshape(num_tokens, num_experts)
    ids = torch.topk(choice.masked_fill(~in_group, fill), top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights, ids


def check_route(a: dict, ins: list[TensorSpec], expect) -> None:
    """verify's checks of a moe_route node."""
    num_experts = ins[0].shape[-1]
    expect(a["scoring"] in SCORINGS, f"scoring must be one of {SCORINGS}; got {a['scoring']!r}")
    expect(len(ins) == 1 or (a["scoring"] == "sigmoid_group_topk" and tuple(ins[1].shape) == (num_experts,)
                             and ins[1].dtype == "float32"),
           "a correction bias is sigmoid_group_topk's only, float32 [E]")
    if a["scoring"] in GROUP_SCORINGS:
        groups, topk_group = a.get("n_group", 1), a.get("topk_group", 1)
        expect(isinstance(groups, int) and groups >= 1 and num_experts % groups == 0,
               f"n_group must divide the {num_experts} experts; got {groups!r}")
        expect(isinstance(topk_group, int) and 1 <= topk_group <= groups, "topk_group must be in 1..n_group")
        expect(a["top_k"] <= topk_group * (num_experts // groups), "top_k must fit in topk_group groups")
        expect(a["scoring"] != "sigmoid_group_topk" or num_experts // groups >= 2,
               "sigmoid_group_topk scores a group by its two best experts: groups need 2 or more")


def expert_act(gate: torch.Tensor, up: torch.Tensor, act: str, alpha: float = 1.702,
               limit: float = 7.0) -> torch.Tensor:
    """The gated activation of one expert's gate and up projections (float32 in, float32 out)."""
    if act == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu":
        return F.gelu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown expert act {act!r}")


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, *, act: str,
                alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    return _run_experts(x, weights, ids, w13.shape[0], lambda e: (w13[e].float(), w2[e].float()), b13, b2, act,
                        alpha, limit)


def _run_experts(x, weights, ids, num_experts: int, expert_weights, b13, b2, act: str, alpha: float, limit: float,
                 quantize=None) -> torch.Tensor:
    """moe_experts over `expert_weights(e)` = (w13[e], w2[e]) float32; `quantize` (float32 [rows, K] -> float32)
    stands for the FP8 activations of both projections (the intermediate is rounded to x's dtype first, where
    the kernels store it)."""
    xf = x.float() if quantize is None else quantize(x.float())
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in ids.unique().tolist():
        if e < 0:  # an expert another rank holds (expert parallelism: `collectives.shard_ids`)
            continue
        assert 0 <= e < num_experts, f"expert id {e} out of range [0, {num_experts})"
        w13, w2 = expert_weights(e)
        inter = w13.shape[0] // 2
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = xf[tok] @ w13.T
        if b13 is not None:
            h = h + b13[e].float()
        a = expert_act(h[:, :inter], h[:, inter:], act, alpha, limit)
        if quantize is not None:
            a = quantize(a.to(x.dtype).float())
        y = a @ w2.T
        if b2 is not None:
            y = y + b2[e].float()
        out.index_add_(0, tok, y * weights[tok, slot].float()[:, None])
    return out.to(x.dtype)


def moe_experts_mxfp4(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13_blocks: torch.Tensor,
                      w13_scales: torch.Tensor, w2_blocks: torch.Tensor, w2_scales: torch.Tensor,
                      b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, **attrs) -> torch.Tensor:
    return moe_experts(x, weights, ids, mxfp4.dequantize(w13_blocks, w13_scales),
                       mxfp4.dequantize(w2_blocks, w2_scales), b13, b2, **attrs)


def moe_experts_fp8_block(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                          w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, *, act: str,
                          fp8_format: str, act_scheme: str, block_size: list, alpha: float = 1.702,
                          limit: float = 7.0) -> torch.Tensor:
    """moe_experts with FP8 expert weights in [bn, bk] blocks (DeepSeek's 128x128 `weight_scale_inv`):
    w13 [E, 2I, H] with w13_scale [E, 2 * ceil(I/bn), ceil(H/bk)] (the gate rows' blocks, then the up rows':
    gate and up are separate tensors in checkpoints, so a block never spans both), w2 [E, H, I] with
    w2_scale [E, ceil(H/bn), ceil(I/bk)]. Weights are dequantized (bits x scale), and with act_scheme
    "dynamic_group" both projections' activations are quantized per token and bk columns first
    (`fp8.quantize_rows`, as `linear_fp8`'s dynamic_group); "none" keeps them (a16w8)."""
    bn, bk = block_size
    inter = w13.shape[1] // 2
    gate_blocks = -(-inter // bn)

    def expert_weights(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        s13 = w13_scale[e]
        w13_e = torch.cat([fp8.dequantize_weight(w13[e, :inter], s13[:gate_blocks], "block", (bn, bk)),
                           fp8.dequantize_weight(w13[e, inter:], s13[gate_blocks:], "block", (bn, bk))])
        return w13_e, fp8.dequantize_weight(w2[e], w2_scale[e], "block", (bn, bk))

    assert act_scheme in ("dynamic_group", "none"), act_scheme
    quantize = None
    if act_scheme == "dynamic_group":
        def quantize(t: torch.Tensor) -> torch.Tensor:
            q, s = fp8.quantize_rows(t, fp8_format, bk)
            return q.float() * s.repeat_interleave(bk, 1)[:, :t.shape[1]]
    return _run_experts(x, weights, ids, w13.shape[0], expert_weights, None, None, act, alpha, limit, quantize)


def expected_active_experts(num_tokens: int, top_k: int, num_experts: int) -> float:
    """Experts a step of T tokens reads, expected under uniform routing: E * (1 - (1 - k/E)**T); exactly
    k at one token, all E once T is large. The cost model and the benchmarks' bytes-read count use it."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def moe_route_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    rows = ins[0].shape[0]
    return [TensorSpec("float32", (rows, attrs["top_k"])), TensorSpec("int32", (rows, attrs["top_k"]))]


def moe_experts_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0]]


def routed_experts(graph) -> list[dict]:
    """Per moe_experts(_mxfp4) node of `graph`: {"node", "num_experts", "top_k", "route" (the moe_route
    node's attrs), "weights" (its expert weight names)}; for byte accounting (inspect, benchmarks), where a
    token reads only its top-k experts."""
    producers = {out: n for n in graph.nodes for out in n.outputs}
    out = []
    for node in graph.nodes:
        if node.op not in EXPERT_OPS:
            continue
        route = producers[node.inputs[2]]  # the moe_route whose ids it reads, through expert parallelism's
        while route.op != "moe_route":  # shard_ids, or all_to_all of ep_dispatch's slots (rdnac.ir.collectives)
            route = producers[route.inputs[1 if route.op == "ep_dispatch" else 0]]
        route = route.attrs
        weights = [name for name in node.inputs[3:] if name in graph.weights]
        out.append({"node": node, "num_experts": graph.weights[weights[0]].shape[0], "top_k": route["top_k"],
                    "route": route, "weights": weights})
    return out
