"""The linear-attention IR ops (rdnac/ir/linear_attention.py) against transformers' torch fallback for
Qwen3.5's Gated DeltaNet, and their per-sequence state: ragged batches, chunks carried through the slot,
a new sequence starting from zeros whatever its slot holds, padding rows writing nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdnac.errors import GraphError
from rdnac.ir import linear_attention as la
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec
from rdnac.ir.verify import verify

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

HK, HV, DK, DV = 2, 4, 12, 10  # odd head dims, two value heads per key head
C, K = 2 * HK * DK + HV * DV, 4


def _meta(lens: list[int], starts: list[int], slots: list[int]):
    """state_slots, seq_lens, cu_seqlens_q of chunks of `lens` tokens starting at positions `starts`."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([s + n for s, n in zip(starts, lens)], dtype=torch.int32)
    return torch.tensor(slots, dtype=torch.int64), seq_lens, cu


def _gdn_inputs(num_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(num_tokens, HK * DK, generator=g) for _ in range(2))
    v = torch.randn(num_tokens, HV * DV, generator=g)
    a, b = (torch.randn(num_tokens, HV, generator=g) for _ in range(2))
    a_log = torch.empty(HV).uniform_(0.01, 16, generator=g).log()
    dt_bias = torch.randn(HV, generator=g)
    return q, k, v, a, b, a_log, dt_bias


ATTRS = dict(num_k_heads=HK, num_v_heads=HV, k_head_dim=DK, v_head_dim=DV, chunk_size=64)


def _gdn(ins, state, meta):
    return la.gated_delta_rule(*ins, state, *meta, **ATTRS)


def _hf_gdn(q, k, v, a, b, a_log, dt_bias, initial=None, recurrent=False):
    """transformers' fallback on one sequence: (out [L, Hv*Dv], final state [Hv, Dk, Dv])."""
    length = q.shape[0]
    beta, g = b.sigmoid(), -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    args = (q.view(1, length, HK, DK), k.view(1, length, HK, DK), v.view(1, length, HV, DV))
    fn = hf.torch_recurrent_gated_delta_rule if recurrent else hf.torch_chunk_gated_delta_rule
    out, state = fn(*args, g=g[None], beta=beta[None], initial_state=None if initial is None else initial[None],
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out.reshape(length, HV * DV), state[0]


def test_gated_delta_rule_matches_transformers_chunked_and_recurrent():
    ins = _gdn_inputs(150)
    state = torch.full((3, HV, DK, DV), float("nan"))  # slot 2 holds garbage: a new sequence must not read it
    out = _gdn(ins, state, _meta([150], [0], [2]))
    ref, ref_state = _hf_gdn(*ins)
    assert out.shape == (150, HV * DV) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    assert (state[2] - ref_state).abs().max() <= 1e-5
    assert state[:2].isnan().all()  # other slots untouched

    # the recurrent form, token by token, agrees with the chunked one (and with transformers' recurrent form)
    g = -ins[5].exp() * F.softplus(ins[3] + ins[6])
    q = la._l2norm(ins[0].view(150, HK, DK)).repeat_interleave(2, 1) * DK ** -0.5
    k = la._l2norm(ins[1].view(150, HK, DK)).repeat_interleave(2, 1)
    rec, rec_state = la.recurrent_form(q, k, ins[2].view(150, HV, DV), g, ins[4].sigmoid(), torch.zeros(HV, DK, DV))
    assert (rec.reshape(150, -1) - out).abs().max() <= 1e-5 and (rec_state - state[2]).abs().max() <= 1e-5
    hf_rec, _ = _hf_gdn(*ins, recurrent=True)
    assert (hf_rec - rec.reshape(150, -1)).abs().max() <= 1e-5


def test_gated_delta_rule_state_carries_across_chunks_and_decode():
    ins = _gdn_inputs(131, seed=1)
    one = torch.zeros(1, HV, DK, DV)
    whole = _gdn(ins, one, _meta([131], [0], [0]))
    split = torch.zeros(1, HV, DK, DV)
    parts = []
    for start, end in ((0, 50), (50, 100), (100, 130), (130, 131)):  # mid-chunk splits, then one decode token
        piece = [t[start:end] for t in ins[:5]] + list(ins[5:])
        parts.append(_gdn(piece, split, _meta([end - start], [start], [0])))
    assert (torch.cat(parts) - whole).abs().max() <= 1e-5
    assert (split - one).abs().max() <= 1e-5
    # the decode token ran transformers' recurrent form from the prefill's state
    _, prefill_state = _hf_gdn(*[t[:130] for t in ins[:5]], *ins[5:])
    last, _ = _hf_gdn(*[t[130:] for t in ins[:5]], *ins[5:], initial=prefill_state, recurrent=True)
    assert (parts[-1] - last).abs().max() <= 1e-5


def test_gated_delta_rule_ragged_batch_equals_each_sequence_alone():
    lens, slots = [70, 1, 9], [1, 0, 3]
    ins = _gdn_inputs(sum(lens), seed=2)
    state = torch.randn(4, HV, DK, DV)
    before = state.clone()
    # sequence 1 decodes from the state in slot 0; sequences 0 and 2 start (their slots' contents ignored)
    batch = _gdn(ins, state, _meta(lens, [0, 5, 0], slots))
    offsets = [0, 70, 71, 80]
    for i, (n, slot) in enumerate(zip(lens, slots)):
        alone = before.clone()
        piece = [t[offsets[i]:offsets[i + 1]] for t in ins[:5]] + list(ins[5:])
        out = _gdn(piece, alone, _meta([n], [5 if i == 1 else 0], [slot]))
        assert (batch[offsets[i]:offsets[i + 1]] - out).abs().max() <= 1e-6
        assert (state[slot] - alone[slot]).abs().max() <= 1e-6
    assert torch.equal(state[2], before[2])

    # a padding row (slot -1) reads zeros and writes nothing
    pad_state = before.clone()
    _gdn([t[:1] for t in ins[:5]] + list(ins[5:]), pad_state, _meta([1], [0], [-1]))
    assert torch.equal(pad_state, before)


def test_causal_conv1d_matches_transformers_and_carries_its_window():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(90, C, generator=g), torch.randn(C, K, generator=g)
    state = torch.full((2, C, K - 1), float("nan"))
    out = la.causal_conv1d(x, weight, state, *_meta([90], [0], [1]), kernel_size=K)
    ref = hf.causal_conv1d_fn(x.T[None], weight, activation="silu")[0].T
    assert out.shape == x.shape and (out - ref).abs().max() <= 1e-6
    assert torch.equal(state[1], x[-(K - 1):].T)

    # in pieces (one of 2 tokens: shorter than the window) and a decode step, through the slot
    pieces = torch.zeros(1, C, K - 1)
    outs = [la.causal_conv1d(x[s:e], weight, pieces, *_meta([e - s], [s], [0]), kernel_size=K)
            for s, e in ((0, 40), (40, 42), (42, 89))]
    hf_state = torch.cat([torch.zeros(1, C, 1), x[89 - K:89].T[None]], -1)  # transformers keeps K columns
    hf_last = hf.causal_conv1d_update(x[89:].T[None], hf_state, weight, activation="silu")[0].T
    outs.append(la.causal_conv1d(x[89:], weight, pieces, *_meta([1], [89], [0]), kernel_size=K))
    assert (torch.cat(outs) - ref).abs().max() <= 1e-6 and (outs[-1] - hf_last).abs().max() <= 1e-6


def test_gated_rms_norm_and_sigmoid_gate_match_transformers():
    g = torch.Generator().manual_seed(4)
    x, gate = torch.randn(7, HV * DV, generator=g), torch.randn(7, HV * DV, generator=g)
    norm = hf.Qwen3_5RMSNormGated(DV, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        ref = norm(x.view(-1, DV), gate.view(-1, DV)).view(7, -1)
    out = la.gated_rms_norm(x, gate, norm.weight.detach(), num_heads=HV, head_dim=DV, eps=1e-5)
    assert out.shape == x.shape and (out - ref).abs().max() <= 1e-6
    assert torch.equal(la.sigmoid_gate(x, gate), x * torch.sigmoid(gate))


@pytest.mark.parametrize("kernel_size", [1, 6])
def test_verify_refuses_a_conv_kernel_the_state_cannot_hold(kernel_size):
    graph = Graph(
        inputs={"x": TensorSpec("float32", ("T", C)), "conv": TensorSpec("float32", ("NS", C, max(kernel_size - 1, 1))),
                "state_slots": TensorSpec("int64", ("B",)), "seq_lens": TensorSpec("int32", ("B",)),
                "cu_seqlens_q": TensorSpec("int32", ("B1",))},
        weights={"w": WeightSpec("float32", (C, kernel_size))},
        nodes=[Node("conv", "causal_conv1d", ["x", "w", "conv", "state_slots", "seq_lens", "cu_seqlens_q"], ["y"],
                    {"kernel_size": kernel_size, "activation": "silu"})],
        outputs=["y"])
    with pytest.raises(GraphError, match="kernel_size must be in 2..4"):
        verify(graph)
