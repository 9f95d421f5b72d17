"""Linear-attention ops (Gated DeltaNet, Qwen3.5 / Qwen3-Next): references, shape rules and checks.

| op               | inputs                                                          | outputs         |
|------------------|-----------------------------------------------------------------|-----------------|
| causal_conv1d    | x [T, C], weight [C, K], conv_state [NS, C, K-1], state_slots [B], | [T, C]       |
|                  | seq_lens [B], cu_seqlens_q [B+1]                                |  (conv_state)   |
| gated_delta_rule | q, k [T, Hk*Dk], v [T, Hv*Dv], a, b [T, Hv], A_log, dt_bias [Hv], | [T, Hv*Dv]    |
|                  | state [NS, Hv, Dk, Dv], state_slots [B], seq_lens [B], cu_seqlens_q [B+1] | (state) |
| gated_rms_norm   | x [T, H*D], gate [T, H*D], weight [D]                           | [T, H*D]        |
| gated_rms_norm_quant | gated_rms_norm's inputs                                     | q [T, H*D], scale [T, 1] |
| sigmoid_gate     | x [T, N], gate [T, N] or [T, 1]                                 | x * sigmoid(gate) |
| sigmoid_gate_quant | sigmoid_gate's inputs                                         | q [T, N], scale [T, 1] |

Per-sequence state lives in slots (ir/state.py kinds "conv" and "recurrent"):
sequence b of the flat batch (tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1])
reads and writes slot state_slots[b]. A chunk that starts a sequence
(seq_lens[b] == its token count, i.e. position 0) reads zeros instead of the
slot, so a slot handed to a new sequence, or to a preempted one computed again
from its start, needs no clearing. A slot < 0 marks a padding row: it reads
zeros and writes nothing. Chunked prefill carries the state from chunk to
chunk through the slot.

`causal_conv1d`: the depthwise causal convolution of the q/k/v channels over
the window [previous K-1 inputs, this chunk], out[t, c] = sum_j
weight[c, j] * window[t + j, c], then `activation` ("silu" or "none"); the
slot keeps the last K-1 inputs, in the state's dtype (the model's dtype, as
transformers keeps it). The op checks `kernel_size` within
CONV_KERNEL_SIZES: the state holds K-1 columns, so K = 1 keeps none.

`gated_delta_rule` is transformers' torch fallback (Qwen3_5GatedDeltaNet) in
float32: beta = sigmoid(b) (in b's dtype), g = -exp(A_log) * softplus(a +
dt_bias); q and k L2-normalised per head (eps 1e-6), q scaled by Dk^-0.5; each
q/k head serves Hv/Hk consecutive value heads. Per token t:
S = S * exp(g_t); S += k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t, with S
[Dk, Dv] per value head, kept in float32 in the slot. A chunk of one token that
continues a sequence (decode) runs this recurrent form; any other chunk runs
the chunked (WY) form over blocks of `chunk_size` tokens counted from the
chunk's first token, as transformers' chunked prefill does. The two forms
agree to float32 rounding (tests check it).

`gated_rms_norm` (Qwen3_5RMSNormGated): per head of D, y = weight *
norm(x) (statistic in float32, cast back to x's dtype before the weight, as
the plain rms_norm does), then y * act(gate) in float32, cast to x's dtype.

`gated_rms_norm_quant`: gated_rms_norm, then `rdnac.ir.fp8.quantize_rows` per
token (attrs fp8_format, an 8-bit format, int8 included, and group 0): the
out_proj's activations, quantized by the norm (`fuse_norm_quant`).

`sigmoid_gate`: the output gate of gated full attention ([T, N]) and of a
shared expert ([T, 1], one per token), x * sigmoid(gate) in x's dtype.
`sigmoid_gate_quant`: sigmoid_gate, then `quantize_rows` per token (attrs
fp8_format, group 0): o_proj's activations, quantized by the gate (`fuse_act_quant`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdnac.ir.graph import TensorSpec

CONV_KERNEL_SIZES = range(2, 5)  # causal-conv1d's widths; Qwen3.5 and Qwen3-Next use 4
CONV_ACTIVATIONS = ("silu", "none")
OP_NAMES = ("causal_conv1d", "gated_delta_rule", "gated_rms_norm", "gated_rms_norm_quant", "sigmoid_gate",
            "sigmoid_gate_quant")

# ---------------------------------------------------------------- per-sequence state


def _sequences(state_slots: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor):
    """(b, first token, end token, slot, whether the chunk starts its sequence) of every non-empty chunk."""
    cu, lens, slots = cu_seqlens_q.tolist(), seq_lens.tolist(), state_slots.tolist()
    for b, slot in enumerate(slots):
        start, end = cu[b], cu[b + 1]
        if end > start:
            yield b, start, end, slot, lens[b] == end - start


def _initial(state: torch.Tensor, slot: int, is_first: bool) -> torch.Tensor:
    if slot < 0 or is_first:
        return torch.zeros_like(state[0])
    return state[slot]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, kernel_size: int,
                  activation: str = "silu") -> torch.Tensor:
    out = torch.empty_like(x)  # [T, C]
    for _b, start, end, slot, is_first in _sequences(state_slots, seq_lens, cu_seqlens_q):
        previous = _initial(conv_state, slot, is_first)  # [C, K-1]
        window = torch.cat([previous.to(weight.dtype), x[start:end].T.to(weight.dtype)], dim=1)  # [C, K-1+L]
        y = F.conv1d(window[None], weight[:, None, :], groups=weight.shape[0])[0]  # [C, L]
        if activation == "silu":
            y = F.silu(y)
        out[start:end] = y.T.to(x.dtype)
        if slot >= 0:
            conv_state[slot] = window[:, window.shape[1] - (kernel_size - 1):].to(conv_state.dtype)
    return out


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def recurrent_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [L, H, Dk] (normalised and scaled), v [L, H, Dv], g, beta [L, H], state [H, Dk, Dv];
    all float32. Returns (out [L, H, Dv], final state)."""
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        state = state * g[t].exp()[:, None, None]
        predicted = (state * k[t][:, :, None]).sum(dim=1)  # [H, Dv]: what the state recalls for k_t
        delta = (v[t] - predicted) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = (state * q[t][:, :, None]).sum(dim=1)
    return out, state


def chunked_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence over blocks of `chunk_size` tokens (the WY representation: within a block the
    delta-rule updates are one triangular solve and a few matmuls). Arguments as `recurrent_form`."""
    length = q.shape[0]
    pad = -length % chunk_size
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q, k, v))  # [H, L', D]
    g, beta = (F.pad(x.T, (0, pad)) for x in (g, beta))  # [H, L']
    num_heads, padded = g.shape
    split = (num_heads, padded // chunk_size, chunk_size)
    q, k, v = (x.reshape(*split, x.shape[-1]) for x in (q, k, v))  # [H, N, C, D]
    g, beta = g.reshape(split), beta.reshape(split)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = g.cumsum(dim=-1)  # [H, N, C]: log of the decay from the block's start to each token
    is_future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(is_future, float("-inf")).exp()  # [H, N, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # (I + strictly lower part) solves the block's updates
    scores = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    block_decay = cum[..., -1].exp()  # [H, N]
    out = torch.empty_like(v)
    for n in range(split[1]):
        v_new = u[:, n] - w[:, n] @ state  # [H, C, Dv]: the part the state does not already predict
        out[:, n] = q_decayed[:, n] @ state + scores[:, n] @ v_new
        state = state * block_decay[:, n, None, None] + k_to_end[:, n].transpose(-1, -2) @ v_new
    out = out.reshape(num_heads, padded, -1)[:, :length].transpose(0, 1)  # [L, H, Dv]
    return out, state


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, state_slots: torch.Tensor,
                     seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, num_k_heads: int, num_v_heads: int,
                     k_head_dim: int, v_head_dim: int, chunk_size: int = 64) -> torch.Tensor:
    num_tokens, group, dtype = q.shape[0], num_v_heads // num_k_heads, q.dtype
    beta = b.sigmoid().float()  # [T, Hv]
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # [T, Hv]
    q = _l2norm(q.reshape(num_tokens, num_k_heads, k_head_dim).float()).repeat_interleave(group, dim=1)
    k = _l2norm(k.reshape(num_tokens, num_k_heads, k_head_dim).float()).repeat_interleave(group, dim=1)
    q = q * k_head_dim ** -0.5
    v = v.reshape(num_tokens, num_v_heads, v_head_dim).float()
    out = torch.zeros(num_tokens, num_v_heads, v_head_dim, dtype=torch.float32, device=v.device)
    for _b, start, end, slot, is_first in _sequences(state_slots, seq_lens, cu_seqlens_q):
        initial = _initial(state, slot, is_first).float()
        span = slice(start, end)
        if end - start == 1 and not is_first:  # decode: transformers' recurrent form
            o, final = recurrent_form(q[span], k[span], v[span], g[span], beta[span], initial)
        else:
            o, final = chunked_form(q[span], k[span], v[span], g[span], beta[span], initial, chunk_size)
        out[span] = o
        if slot >= 0:
            state[slot] = final.to(state.dtype)
    return out.reshape(num_tokens, num_v_heads * v_head_dim).to(dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, num_heads: int, head_dim: int,
                   eps: float, act: str = "silu") -> torch.Tensor:
    num_tokens = x.shape[0]
    xf = x.reshape(num_tokens, num_heads, head_dim).float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = weight * normed
    if act == "silu":
        y = y * F.silu(gate.reshape(num_tokens, num_heads, head_dim).float())
    return y.to(x.dtype).reshape(num_tokens, num_heads * head_dim)


def gated_rms_norm_quant(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, num_heads: int,
                         head_dim: int, eps: float, act: str = "silu", fp8_format: str,
                         group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) = quantize_rows(gated_rms_norm(...)): the GDN output in out_proj's 8-bit activations."""
    from rdnac.ir.fp8 import quantize_rows

    assert group == 0, f"gated_rms_norm_quant quantizes per token (group 0); got group {group}"
    return quantize_rows(gated_rms_norm(x, gate, weight, num_heads=num_heads, head_dim=head_dim, eps=eps, act=act),
                         fp8_format, group)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(gate)


def sigmoid_gate_quant(x: torch.Tensor, gate: torch.Tensor, *, fp8_format: str,
                       group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) = quantize_rows(sigmoid_gate(x, gate)): gated attention's output in o_proj's 8-bit activations."""
    from rdnac.ir.fp8 import quantize_rows

    assert group == 0, f"sigmoid_gate_quant quantizes per token (group 0); got group {group}"
    return quantize_rows(sigmoid_gate(x, gate), fp8_format, group)


# ---------------------------------------------------------------- shape rules and checks


def same_as_x(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0]]


def gated_delta_rule_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], attrs["num_v_heads"] * attrs["v_head_dim"]))]


def check(op: str, a: dict, ins: list[TensorSpec], expect) -> None:
    """verify's checks of one linear-attention node: `expect(condition, what)` fails naming the node."""
    if op == "causal_conv1d":
        size = a["kernel_size"]
        expect(size in CONV_KERNEL_SIZES, f"kernel_size must be in {CONV_KERNEL_SIZES.start}.."
               f"{CONV_KERNEL_SIZES.stop - 1} (the state keeps kernel_size-1 inputs); got {size}")
        channels = ins[0].shape[-1]
        expect(ins[1].shape == (channels, size), "weight must be [C, kernel_size]")
        expect(tuple(ins[2].shape[1:]) == (channels, size - 1), "conv_state must be [NS, C, kernel_size-1]")
        expect(a.get("activation", "silu") in CONV_ACTIVATIONS, f"activation must be one of {CONV_ACTIVATIONS}")
    elif op == "gated_delta_rule":
        hk, hv, dk, dv = a["num_k_heads"], a["num_v_heads"], a["k_head_dim"], a["v_head_dim"]
        expect(hv % hk == 0, "num_v_heads must be a multiple of num_k_heads")
        expect(ins[0].shape[-1] == ins[1].shape[-1] == hk * dk, "q and k must be [T, num_k_heads*k_head_dim]")
        expect(ins[2].shape[-1] == hv * dv, "v must be [T, num_v_heads*v_head_dim]")
        expect(ins[3].shape[-1] == ins[4].shape[-1] == hv, "a and b must be [T, num_v_heads]")
        expect(ins[5].shape == ins[6].shape == (hv,), "A_log and dt_bias must be [num_v_heads]")
        expect(tuple(ins[7].shape[1:]) == (hv, dk, dv), "state must be [NS, num_v_heads, k_head_dim, v_head_dim]")
        expect(ins[7].dtype == "float32", "the recurrent state must be float32")
        expect(a.get("chunk_size", 64) > 0, "chunk_size must be positive")
    elif op in ("gated_rms_norm", "gated_rms_norm_quant"):
        if op == "gated_rms_norm_quant":
            expect(a["fp8_format"] in ("e4m3fn", "e4m3fnuz", "int8") and a["group"] == 0,
                   f"fp8_format must be e4m3fn, e4m3fnuz or int8, group 0; got {a['fp8_format']!r}, {a['group']!r}")
        expect(ins[0].shape[-1] == ins[1].shape[-1] == a["num_heads"] * a["head_dim"],
               "x and gate must be [T, num_heads*head_dim]")
        expect(ins[2].shape == (a["head_dim"],), "weight must be [head_dim]")
        expect(a.get("act", "silu") in ("silu", "none"), "act must be silu or none")
    elif op in ("sigmoid_gate", "sigmoid_gate_quant"):
        if op == "sigmoid_gate_quant":
            expect(a["fp8_format"] in ("e4m3fn", "e4m3fnuz", "int8") and a["group"] == 0,
                   f"fp8_format must be e4m3fn, e4m3fnuz or int8, group 0; got {a['fp8_format']!r}, {a['group']!r}")
        expect(ins[0].shape == ins[1].shape or (ins[1].shape[0] == ins[0].shape[0] and ins[1].shape[-1] == 1),
               "gate must be x's shape [T, N] or one per token [T, 1]")
