"""Choose each MLA attention's form per phase and add the absorbed form's weights.

    mla_attention(q, latent_cache, ..., kv_b)
        ==>   mla_attention(q, latent_cache, ..., kv_b, w_uk, w_uv)
              [prefill_form="expanded", decode_form="absorbed"]

Prefill expands the cached latents to per-head keys and values through
kv_b: a chunk's many queries share one expansion, and the attention is an
ordinary one over H heads of Dn+Dr. Decode has one query per sequence, so
expanding every cached token would read and compute H*(Dn+Dv) per token
per step; the absorbed form folds W_UK into the query and applies W_UV
after attention, reading only the R+Dr latent entry per cached token.
w_uk [H, R, Dn] and w_uv [H, Dv, R] are kv_b's rows regrouped per head once,
here, in kv_b's dtype (the compute dtype; an FP8 kv_b_proj was dequantized
by the frontend). Both forms compute the same function (ir/mla.py); each
choice is logged with the bytes per cached token it reads.

GPU targets run prefill in the absorbed form too (rdnac/kernels/mla_attention.py):
expanding a chunk's cached context needs its length on the host, which would
break graph capture; the form is set on the node, so the plan graph (and
the interpreter run on it) states what the kernels compute.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.ir.graph import WeightSpec
from rdnac.ir.mla import absorbed_weights

NAME = "mla_forms"


def run(state: CompileState) -> None:
    graph, weights = state.graph, state.weights
    for node in graph.nodes:
        if node.op != "mla_attention" or len(node.inputs) != 7:
            continue
        a = node.attrs
        kv_b = node.inputs[6]
        w_uk, w_uv = absorbed_weights(weights[kv_b], a["num_heads"], a["qk_nope_head_dim"], a["v_head_dim"])
        stem = kv_b.removesuffix(".weight")
        dtype = graph.weights[kv_b].dtype
        for leaf, w in (("w_uk", w_uk), ("w_uv", w_uv)):
            weights[f"{stem}.{leaf}"] = w
            graph.weights[f"{stem}.{leaf}"] = WeightSpec(dtype, tuple(w.shape), "none",
                                                         source=f"{leaf} per head of {kv_b}")
        node.inputs += [f"{stem}.w_uk", f"{stem}.w_uv"]
        prefill = "absorbed" if state.target.is_gpu else "expanded"
        a.update(prefill_form=prefill, decode_form="absorbed")
        heads, rank, dr = a["num_heads"], a["kv_lora_rank"], a["qk_rope_head_dim"]
        item = weights[kv_b].element_size()
        expanded = heads * (a["qk_nope_head_dim"] + dr + a["v_head_dim"]) * item
        why_prefill = ("the GPU kernel's latent form: expanding the cached context needs its length on the host, "
                       "a sync graph capture forbids; " if state.target.is_gpu
                       else "prefill shares one expansion over its queries; ")
        state.decide(NAME, node.name, f"prefill: {prefill}; decode: absorbed (W_UK into the query, W_UV after)",
                     f"decode reads the latent cache directly, {(rank + dr) * item} bytes per cached token instead "
                     f"of {expanded} for expanded keys and values; {why_prefill}"
                     f"w_uk {list(w_uk.shape)} and w_uv {list(w_uv.shape)} regrouped from {kv_b} in {dtype}")
