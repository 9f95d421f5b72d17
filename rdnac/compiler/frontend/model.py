"""`build_model`: a `ModelSpec` (or a `Wrapper` around one) and a checkpoint -> the IR graph.

The one layer loop every family shares: step inputs, embedding, each
layer's blocks in order, final norm and logits; then `GraphBuilder.finish`
checks every checkpoint tensor was used or ignored on purpose. The model's
attributes (`Graph.attrs`) are the same keys for every family.
"""

from __future__ import annotations

from rdnac.compiler.frontend.blocks import Model, embedding, head, step_inputs
from rdnac.compiler.frontend.builder import GraphBuilder
from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.compiler.frontend.spec import ACTIVATIONS, Config, ModelSpec, Wrapper, embedding_scale
from rdnac.errors import UnsupportedModelError


def build_model(spec: ModelSpec | Wrapper, checkpoint: Checkpoint, dtype: str):
    """(graph, weights, decisions) of `checkpoint` built as `spec`."""
    path = checkpoint.path
    b = GraphBuilder(checkpoint, dtype)
    arch = spec.architecture
    if isinstance(spec, Wrapper):
        spec = spec.text_spec(b, checkpoint.config, path)
    c = Config(path, {**spec.defaults, **checkpoint.config})
    m = _model(spec, b, c, dtype, path, step_inputs(b))
    max_positions = (spec.max_positions(b, c) if spec.max_positions else
                     c.dim("max_position_embeddings") if "max_position_embeddings" in c else 4096)
    tied = c.get("tie_word_embeddings", False)
    for pattern, reason in spec.ignore:
        b.ignore(pattern, reason)
    for key, reason in spec.inert_config:
        if c.get(key) is not None:
            b.decide("model", f"{key} {c[key]!r} not applied", reason)
    if tied:
        b.ignore(r"lm_head\.weight", "tie_word_embeddings: the logits reuse model.embed_tokens.weight")

    h = embedding(m, embedding_scale(spec, m.hidden, dtype))
    num_layers = len(m.attention)
    for i in range(num_layers):
        for block in spec.blocks(c, i):
            h = block.emit(m, h, i)
    softcap = float(c.get(spec.final_softcap_key) or 0.0) if spec.final_softcap_key else 0.0
    head(m, h, tied, softcap)
    windows = [layer.sliding_window for layer in m.attention if layer is not None]
    if any(windows):
        b.decide("attention", "sliding window", f"per-layer windows {sorted(set(windows))} from config.json")
    if softcap:
        b.decide("logits", f"soft-cap {softcap:g}", f"{spec.final_softcap_key} from config.json: "
                 f"logits = {softcap:g} * tanh(logits / {softcap:g})")
    attrs = {"architecture": arch, "num_layers": num_layers, "hidden_size": m.hidden, "num_heads": m.num_heads,
             "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "vocab_size": m.vocab,
             "intermediate_size": m.intermediate, "max_position_embeddings": max_positions, "dtype": dtype,
             "tie_word_embeddings": bool(tied)}
    return (*b.finish(["logits"], attrs), b.decisions)


def _model(spec: ModelSpec, b: GraphBuilder, c: Config, dtype: str, path, step: dict[str, str]) -> Model:
    hidden, num_layers = c.dim("hidden_size"), c.dim("num_hidden_layers")
    num_heads = c.dim("num_attention_heads")
    num_kv_heads = c.dim("num_key_value_heads") if c.get("num_key_value_heads") else num_heads
    head_dim = c.dim("head_dim") if c.get("head_dim") else hidden // num_heads
    act_name = c.get(spec.activation_key, "silu")
    act = ACTIVATIONS.get(act_name)
    if act is None:
        raise UnsupportedModelError(f"{path}: {spec.activation_key} {act_name!r} is not supported; "
                                    f"supported: {sorted(ACTIVATIONS)}")
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{path}: num_attention_heads {num_heads} requires a multiple of "
                                    f"num_key_value_heads; got {num_kv_heads}")
    attention = spec.attention_layers(c, head_dim, path)
    assert len(attention) == num_layers, (len(attention), num_layers)
    return Model(b, c, dtype, hidden, num_heads, num_kv_heads, head_dim, c.dim("intermediate_size"), c.dim("vocab_size"),
                 c.get("rms_norm_eps", 1e-6), act, spec.unit_offset_norms, attention, step)
