"""Qwen3-Next spec: Qwen3NextForCausalLM (Qwen3-Next-80B-A3B).

The hybrid layer of Qwen3.5 (qwen3_5.py: Gated DeltaNet or gated full
attention per `layer_types`, partial RoPE, 1 + w RMSNorms), with two
differences: the GDN input projections are fused per key head
(`in_proj_qkvz`, `in_proj_ba`; regrouped once at compile time, see
gated_deltanet.split_fused_projections), and the feed-forward follows
Qwen3-MoE's rule (experts in layer i unless i is in `mlp_only_layers` or
(i + 1) % `decoder_sparse_step` != 0, renormalized when `norm_topk_prob`),
with a gated shared expert beside the routed ones (shared_expert.py).
"""

from __future__ import annotations

from rdnac.compiler.frontend import qwen3_5
from rdnac.compiler.frontend.blocks import Residual
from rdnac.compiler.frontend.gated_deltanet import GatedDeltaNet
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.qwen3_moe import is_sparse
from rdnac.compiler.frontend.shared_expert import SharedExpertMoE
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, config_file
from rdnac.errors import UnsupportedModelError

# Qwen3NextConfig's defaults
DEFAULTS = {**qwen3_5.DEFAULTS, "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 48, "num_key_value_heads": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10,
            "num_experts": 512, "norm_topk_prob": True}

SPARSE = Residual(SharedExpertMoE(MoE()), ("post_attention_layernorm", "post_norm"), "moe_residual")


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer | None]:
    step = c["decoder_sparse_step"]
    if not isinstance(step, int) or step < 1:  # checked here, where the path is known, for the feed-forward rule
        raise UnsupportedModelError(f"{config_file(path)}: decoder_sparse_step requires a positive integer; "
                                    f"got {step!r}")
    return qwen3_5.attention_layers(c, head_dim, path)


QWEN3_NEXT = ModelSpec(
    "Qwen3NextForCausalLM", (), attention_layers, defaults=DEFAULTS, unit_offset_norms=True,
    layer_of=qwen3_5.hybrid_layer_of(GatedDeltaNet(fused_projections=True),
                                     lambda c, i: SPARSE if is_sparse(c, i) else qwen3_5.DENSE_MLP),
    ignore=qwen3_5.IGNORE, inert_config=qwen3_5.INERT)

ARCHITECTURES = {QWEN3_NEXT.architecture: QWEN3_NEXT}
