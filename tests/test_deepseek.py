"""DeepSeek V3 / V2 (multi-head latent attention, DeepSeek MoE routing) against transformers (fp32, cpu).

Tiny random checkpoints written by transformers' save_pretrained at odd
sizes (hidden 45, 3 heads of nope 10 + rope 6, value 14, kv_lora_rank 18,
expert intermediate 13): a dense first layer then MoE layers with a shared
expert, 8 routed experts top-3.

- "v3": q LoRA (22), YaRN with mscale / mscale_all_dim, sigmoid routing with
  a random e_score_correction_bias over n_group 4 / topk_group 2,
  renormalized, routed_scaling_factor 2.5, interleaved RoPE; a tokenizer and
  an R1-style chat template (<think>).
- "v3-neox": no q LoRA, rope_interleave false, n_group 1, not renormalized.
- "v2": no q LoRA (V2-Lite), softmax group_limited_greedy routing,
  routed_scaling_factor 1.5.

transformers' attention and experts run eager. The plan's decode runs the
absorbed MLA form, prefill the expanded one; both forms are compared on the
same plan. FP8 block checkpoints in DeepSeek's native layout
(rdnac.testing.deepseek) are compared teacher-forced against transformers on
the dequantized weights. Bad checkpoints fail in one line, writing nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rdnac
from rdnac import SamplingParams
from rdnac.errors import CheckpointError, UnsupportedModelError
from rdnac.ir import interpreter
from rdnac.ir.graph import Graph
from tests.support.cases import built_once
from tests.support.checkpoints import (check_logits_match, perturb_norms, reference_greedy, reference_logits,
                                      write_byte_tokenizer)
from tests.support.same_tokens import check_batched_greedy_matches_alone

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
TOL = 1e-4
BASE = dict(hidden_size=45, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
            vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
            kv_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, moe_intermediate_size=13,
            n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1,
            tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
CASES = {
    "v3": ("deepseek_v3", dict(q_lora_rank=22, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                               rope_parameters=YARN)),
    "v3-neox": ("deepseek_v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                    routed_scaling_factor=1.0, rope_interleave=False)),
    "v2": ("deepseek_v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               routed_scaling_factor=1.5)),
}
SCORING = {"v3": "sigmoid_group_topk", "v3-neox": "sigmoid_group_topk", "v2": "softmax_group_topk"}
ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

# The markup of DeepSeek-R1's chat template: BOS, a system prompt gathered first, <｜User｜>/<｜Assistant｜>
# turns, earlier reasoning cut at </think>, and a generation prompt that opens a <think> block.
R1_STYLE_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def make_deepseek(directory, model_type: str, *, seed: int = 0, decisive: bool = False, **overrides):
    """A tiny random DeepSeek written by transformers' save_pretrained; returns the fp32 model (eager).

    `decisive` gives the peaked predictions of a trained model (as rdnac.testing.fp8's decisive
    checkpoints): unit-scale embeddings, lm_head row j = embedding row (7919 j + 1) mod V, and every
    output projection scaled by 0.1, so top-1 compares FP8 against float where ties are not near."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    perturb_norms(model)
    with torch.no_grad():  # random init leaves the correction bias at 0: perturb it too
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn_like(bias) * 0.1)
        if decisive:
            embed = model.model.embed_tokens.weight
            embed.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
            rows = torch.arange(embed.shape[0])
            model.lm_head.weight.copy_(embed[(7919 * rows + 1) % embed.shape[0]])
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    p.mul_(0.1)
    model.save_pretrained(directory)
    return model


def _build(name: str, root):
    model_type, overrides = CASES[name]
    model = make_deepseek(root / "ckpt", model_type, **overrides)
    if name == "v3":
        write_byte_tokenizer(root / "ckpt", BASE["vocab_size"], chat_template=R1_STYLE_TEMPLATE,
                             bos_token="<|endoftext|>")
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "plan.msgpack", quiet=True)
    return name, root, model, rdnac.load(plan)


checkpoints, case = built_once(_build, sorted(CASES))


def test_logits_match_transformers(case):
    _, _, model, engine = case
    check_logits_match(engine, model, PROMPT, atol=TOL)


def test_greedy_continuation_matches_transformers(case):
    _, _, model, engine = case
    assert engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids == reference_greedy(model, PROMPT, 24)


def test_graph_has_latent_state_dense_first_layer_and_deepseek_routing(case):
    name, _, model, engine = case
    c = model.config
    graph = engine.plan.graph()
    rank, dr = c.kv_lora_rank, c.qk_rope_head_dim
    assert [(s.name, s.kind, s.shape, s.dtype, s.nbytes) for s in graph.state] == \
        [(f"latent_cache.{i}", "paged_latent", (rank + dr,), "float32", 4 * (rank + dr)) for i in range(3)]
    nodes = {n.name: n for n in graph.nodes}
    assert "layers.0.experts" not in nodes and {"layers.1.experts", "layers.2.experts"} <= set(nodes)
    route = nodes["layers.1.route"].attrs
    assert route["scoring"] == SCORING[name] and route["top_k"] == 3
    assert route["routed_scaling_factor"] == c.routed_scaling_factor
    assert (route["n_group"], route["topk_group"]) == (c.n_group, c.topk_group)
    assert route.get("renormalize", False) == (name != "v2" and c.norm_topk_prob)
    if name.startswith("v3"):  # the correction bias is a float32 input of the route, for selection only
        bias = nodes["layers.1.route"].inputs[1]
        assert graph.weights[bias].dtype == "float32"
        assert torch.equal(engine.runner.weights[bias], model.model.layers[1].mlp.gate.e_score_correction_bias)
    attn = nodes["layers.0.attn"]
    assert attn.op == "mla_attention"
    assert (attn.attrs["prefill_form"], attn.attrs["decode_form"]) == ("expanded", "absorbed")
    assert attn.attrs["style"] == ("neox" if name == "v3-neox" else "gptj")
    assert (f"layers.0.q_a_norm" in nodes) == (c.q_lora_rank is not None)
    decisions = engine.plan.body["decisions"]
    assert any(d["pass"] == "mla_forms" and d["node"] == "layers.2.attn" for d in decisions)


def test_yarn_scale_correction_moves_the_logits(checkpoints, tmp_path):
    """Dropping mscale_all_dim (the softmax-scale correction) moves the logits far past the tolerance: the
    comparison above exercises it."""
    _, root, model, _ = checkpoints("v3")
    config = json.loads((root / "ckpt" / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "mscale_all_dim": 0.0}
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    other = rdnac.load(rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "p.msgpack", quiet=True))
    err = (other.logits(PROMPT) - reference_logits(model, PROMPT)).abs().max().item()
    assert err > 100 * TOL, f"mscale_all_dim moved the logits by only {err:.3g}"


def test_dense_and_sparse_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    """DeepSeek's rule (transformers reads first_k_dense_replace only; every released config has
    moe_layer_freq 1, where the two agree)."""
    from rdnac.compiler.frontend.deepseek import is_sparse

    c = {"n_routed_experts": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1}
    assert [is_sparse(c, i) for i in range(6)] == [False] * 3 + [True] * 3
    assert [is_sparse({**c, "moe_layer_freq": 2}, i) for i in range(6)] == [False, False, False, False, True, False]
    assert not any(is_sparse({**c, "n_routed_experts": None}, i) for i in range(6))


def test_v4_rope_scaling_config_gives_the_same_graph(checkpoints, tmp_path):
    """The released V3/R1 config.json form (rope_theta and rope_scaling with "type": "yarn") reads as the
    transformers 5 rope_parameters form does."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    _, root, _, _ = checkpoints("v3")
    config = json.loads((root / "ckpt" / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    shutil.copytree(root / "ckpt", tmp_path / "v4")
    (tmp_path / "v4" / "config.json").write_text(json.dumps(config))
    ref, _, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    graph, _, _ = build_graph(read_checkpoint(tmp_path / "v4"), "float32")
    assert [n.to_dict() for n in graph.nodes] == [n.to_dict() for n in ref.nodes]
    assert graph.node("layers.0.attn").attrs["scaling"]["mscale_all_dim"] == 0.8


# ---------------------------------------------------------------- absorbed against expanded on one plan


def _step(graph: Graph, tokens: list[int], start: int, num_blocks: int, block_size: int) -> dict:
    num_tokens = len(tokens)
    positions = torch.arange(start, start + num_tokens)
    inputs = {"token_ids": torch.tensor(tokens), "positions": positions, "slot_mapping": positions.clone(),
              "block_tables": torch.arange(num_blocks, dtype=torch.int32)[None],
              "seq_lens": torch.tensor([start + num_tokens], dtype=torch.int32),
              "cu_seqlens_q": torch.tensor([0, num_tokens], dtype=torch.int32),
              "logits_indices": torch.tensor([num_tokens - 1])}
    assert set(inputs) | {s.name for s in graph.state} == set(graph.inputs)
    return inputs


def test_absorbed_decode_matches_expanded_on_the_same_plan(case):
    """The plan's graph as compiled (decode absorbed) and with decode_form set to expanded: after the same
    prefill, 12 decode steps fed the same tokens give logits within 1e-5."""
    _, _, _, engine = case
    absorbed = engine.plan.graph()
    expanded = Graph.from_dict(absorbed.to_dict())
    for node in expanded.nodes:
        if node.op == "mla_attention":
            assert node.attrs["decode_form"] == "absorbed"
            node.attrs["decode_form"] = "expanded"
    weights, block_size, num_blocks = engine.runner.weights, 16, 4
    caches = {id(g): {s.name: torch.zeros(num_blocks, block_size, *s.shape) for s in g.state}
              for g in (absorbed, expanded)}
    tokens, start, worst = list(PROMPT), 0, 0.0
    for step in range(13):
        out = {}
        for g in (absorbed, expanded):
            inputs = {**_step(g, tokens[start:], start, num_blocks, block_size), **caches[id(g)]}
            out[id(g)] = interpreter.run(g, weights, inputs)["logits"]
        if step:  # a decode step: one token continuing the sequence
            worst = max(worst, (out[id(absorbed)] - out[id(expanded)]).abs().max().item())
        else:
            assert torch.equal(out[id(absorbed)], out[id(expanded)])  # prefill runs the expanded form in both
        start = len(tokens)
        tokens.append(int(out[id(absorbed)][0].argmax()))
    assert worst <= 1e-5, f"absorbed vs expanded decode: max abs logit difference {worst:.3g}"


def test_mla_forms_agree_on_random_chunks():
    """The op alone: a prefill chunk and a decode chunk in one step, each form against the other."""
    from rdnac.ir.mla import absorbed_weights, mla_attention, mla_cache_write

    gen = torch.Generator().manual_seed(0)
    heads, dn, dr, dv, rank, block_size = 5, 7, 6, 9, 11, 4
    attrs = dict(num_heads=heads, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, kv_lora_rank=rank,
                 scale=0.3, theta=10000.0, style="gptj")
    kv_b = torch.randn(heads * (dn + dv), rank, generator=gen)
    w_uk, w_uv = absorbed_weights(kv_b, heads, dn, dv)
    assert torch.equal(w_uk[1], kv_b[dn + dv:2 * dn + dv].T)
    assert torch.equal(w_uv[2], kv_b[2 * (dn + dv) + dn:3 * (dn + dv)])
    cache = torch.zeros(8, block_size, rank + dr)
    lens = [9, 6]  # sequence 0 decodes its 9th token; sequence 1 prefills 6 tokens
    positions = torch.tensor([8] + list(range(6)))
    block_tables = torch.tensor([[0, 1, 2], [5, 6, 7]], dtype=torch.int32)
    history = torch.arange(8)  # sequence 0's earlier tokens, written first
    slots = torch.cat([history, torch.tensor([8])]).tolist()
    slot_mapping_0 = torch.tensor([block_tables[0, s // block_size].item() * block_size + s % block_size
                                   for s in slots])
    latent, k_pe = torch.randn(9, rank, generator=gen), torch.randn(9, dr, generator=gen)
    mla_cache_write(latent, k_pe, torch.arange(9), slot_mapping_0, cache, kv_lora_rank=rank, qk_rope_head_dim=dr,
                    theta=10000.0)
    latent1, k_pe1 = torch.randn(6, rank, generator=gen), torch.randn(6, dr, generator=gen)
    mla_cache_write(latent1, k_pe1, torch.arange(6), torch.tensor([20, 21, 22, 23, 24, 25]), cache,
                    kv_lora_rank=rank, qk_rope_head_dim=dr, theta=10000.0)
    q = torch.randn(7, heads * (dn + dr), generator=gen)
    args = (q, cache, block_tables, torch.tensor(lens, dtype=torch.int32), torch.tensor([0, 1, 7], dtype=torch.int32),
            positions, kv_b, w_uk, w_uv)
    ref = mla_attention(*args, **attrs)
    assert ref.shape == (7, heads * dv) and ref.dtype == torch.float32
    for forms in (("absorbed", "absorbed"), ("expanded", "absorbed"), ("absorbed", "expanded")):
        out = mla_attention(*args, **attrs, prefill_form=forms[0], decode_form=forms[1])
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"forms {forms}: max abs error {err:.3g}"


def test_verify_names_the_mla_node(checkpoints):
    """verify's MLA checks: an attention reading its latent cache before any write, an absorbed decode
    without its weights, a correction bias on a softmax route."""
    from rdnac.errors import GraphError
    from rdnac.ir.verify import verify

    _, _, _, engine = checkpoints("v3")
    graph = engine.plan.graph()
    verify(graph)
    broken = Graph.from_dict(graph.to_dict())
    broken.nodes = [n for n in broken.nodes if n.name != "layers.1.latent_write"]
    with pytest.raises(GraphError, match=r"node 'layers\.1\.attn' \(mla_attention\): reads latent cache "
                                         r"'latent_cache\.1' before any mla_cache_write"):
        verify(broken)
    broken = Graph.from_dict(graph.to_dict())
    broken.node("layers.0.attn").inputs = broken.node("layers.0.attn").inputs[:7]
    with pytest.raises(GraphError, match=r"node 'layers\.0\.attn' \(mla_attention\): the absorbed form requires "
                                         r"inputs w_uk and w_uv"):
        verify(broken)
    broken = Graph.from_dict(graph.to_dict())
    broken.node("layers.1.route").attrs["scoring"] = "softmax_topk"
    with pytest.raises(GraphError, match=r"node 'layers\.1\.route' \(moe_route\): a correction bias is "
                                         r"sigmoid_group_topk's only"):
        verify(broken)


# ---------------------------------------------------------------- routing against transformers' routers


@pytest.mark.parametrize("model_type,topk_method", [("deepseek_v3", None), ("deepseek_v2", "group_limited_greedy"),
                                                    ("deepseek_v2", "greedy")])
def test_moe_route_matches_transformers_router(model_type, topk_method):
    from transformers import AutoConfig

    from rdnac.compiler.frontend.deepseek import V2_TOPK_METHODS
    from rdnac.ir.moe import moe_route

    experts, top_k = 16, 4
    overrides = {**CASES["v3" if model_type == "deepseek_v3" else "v2"][1], "n_routed_experts": experts,
                 "num_experts_per_tok": top_k}
    if topk_method:
        overrides["topk_method"] = topk_method
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    if model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router
    gen = torch.Generator().manual_seed(1)
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, BASE["hidden_size"], generator=gen))
        if model_type == "deepseek_v3":
            router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen))
    x = torch.randn(37, BASE["hidden_size"], generator=gen)
    logits, ref_weights, ref_ids = router(x)
    scoring = "sigmoid_group_topk" if model_type == "deepseek_v3" else V2_TOPK_METHODS[topk_method].scoring
    bias = (router.e_score_correction_bias,) if model_type == "deepseek_v3" else ()
    weights, ids = moe_route(logits, *bias, top_k=top_k, scoring=scoring, renormalize=config.norm_topk_prob,
                             n_group=config.n_group, topk_group=config.topk_group,
                             routed_scaling_factor=config.routed_scaling_factor)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    order, ref_order = ids.long().sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices),
                               rtol=0, atol=1e-6)


def test_deepseek_routing_has_gpu_kernels_and_mla_needs_the_absorbed_form():
    """The routing kernels cover DeepSeek's scorings (tests/test_kernels_mla.py runs them); the MLA kernels
    compute the absorbed form only, so a node left expanded is refused in one line naming the forms."""
    from rdnac.kernels.registry import REFERENCE_ONLY_OPS, reference_only_attrs

    for scoring in ("sigmoid_group_topk", "softmax_group_topk", "softmax_topk"):
        assert reference_only_attrs("moe_route", {"scoring": scoring, "top_k": 8, "routed_scaling_factor": 2.5}) is None
    assert not {"mla_cache_write", "mla_attention"} & set(REFERENCE_ONLY_OPS)
    why = reference_only_attrs("mla_attention", {"prefill_form": "expanded", "decode_form": "absorbed"})
    assert why and "\n" not in why and "prefill_form 'expanded'" in why
    assert reference_only_attrs("mla_attention", {"prefill_form": "absorbed", "decode_form": "absorbed"}) is None


def test_mtp_layers_are_ignored_with_a_reason(checkpoints, tmp_path):
    """A multi-token-prediction layer (model.layers.{num_hidden_layers}.*, as V3/R1 ship it) is ignored and
    logged; the plan is the same."""
    _, root, _, engine = checkpoints("v3")
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(45, 90), "model.layers.3.enorm.weight": torch.ones(45),
           "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(72, 18)}
    src = _rewrite(root / "ckpt", tmp_path / "mtp", config={"num_nextn_predict_layers": 1},
                   convert=lambda t: {**t, **mtp})
    plan = rdnac.load(rdnac.compile(src, target="cpu", output=tmp_path / "mtp.msgpack", quiet=True))
    decisions = plan.plan.body["decisions"]
    ignored = {d["node"] for d in decisions if d["action"] == "ignored tensor" and "multi-token" in d["reason"]}
    assert ignored == set(mtp)
    assert any(d["action"] == "num_nextn_predict_layers 1 not applied" for d in decisions)
    assert torch.equal(plan.logits(PROMPT), engine.logits(PROMPT))
    extra = _rewrite(root / "ckpt", tmp_path / "extra", config={"num_nextn_predict_layers": 1},
                     convert=lambda t: {**t, **mtp, "model.layers.4.enorm.weight": torch.ones(45)})
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensor\(s\) not used .*model\.layers\.4\.enorm"):
        rdnac.compile(extra, target="cpu", output=tmp_path / "extra.msgpack", quiet=True)


def test_quantize_fp8_keeps_router_and_mla_weights_float(checkpoints, tmp_path):
    """--quantize fp8 on a float DeepSeek: the attention and MLP linears become FP8, the routers stay float
    (their logits pick experts), and the plan still generates."""
    _, root, _, _ = checkpoints("v3")
    llm = rdnac.load(rdnac.compile(root / "ckpt", target="cpu", output=tmp_path / "q.msgpack", quiet=True,
                                   quantize="fp8"))
    nodes = {n.name: n for n in llm.plan.graph().nodes}
    assert nodes["layers.1.router"].op == "linear" and nodes["layers.0.o_proj"].op == "linear_fp8"
    assert len(llm.generate([PROMPT], SamplingParams(max_tokens=4))[0].token_ids) == 4


# ---------------------------------------------------------------- engine, inspect, chat


@pytest.mark.parametrize("concurrency", [1, 3, 17])
def test_llm_engine_concurrent_greedy_matches_alone(case, concurrency):
    _, _, _, engine = case
    prompts = [PROMPT[i % 7:][: 5 + 3 * (i % 5)] + [i + 3] for i in range(concurrency)]
    params = [SamplingParams(max_tokens=4 + i % 5) for i in range(concurrency)]
    check_batched_greedy_matches_alone(engine, prompts, params)


def test_inspect_shows_mla_forms_and_latent_bytes(checkpoints):
    from click.testing import CliRunner

    from rdnac.cli.inspect import summarize
    from rdnac.cli.main import cli

    _, _, model, engine = checkpoints("v3")
    c = model.config
    s = summarize(engine.plan.path)
    latent_bytes = 4 * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert [(m["node"], m["prefill_form"], m["decode_form"], m["latent_bytes_per_token"]) for m in s["mla"]] == \
        [(f"layers.{i}.attn", "expanded", "absorbed", latent_bytes) for i in range(3)]
    assert s["state"]["bytes_per_token"] == 3 * latent_bytes
    text = CliRunner().invoke(cli, ["inspect", str(engine.plan.path)])
    assert text.exit_code == 0, text.output
    assert "multi-head latent attention: 3 layers" in text.output and "absorbed" in text.output


def test_r1_chat_template_renders_as_transformers(checkpoints):
    from transformers import PreTrainedTokenizerFast

    _, root, _, engine = checkpoints("v3")
    ref_tok = PreTrainedTokenizerFast.from_pretrained(root / "ckpt")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello"},
                {"role": "user", "content": "Bye"}]
    ref = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ref.endswith("<｜Assistant｜><think>\n") and "say hi" not in ref
    assert engine.tokenizer.apply_chat_template(messages) == ref
    out = engine.generate([engine.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=3))[0]
    assert len(out.token_ids) == 3


# ---------------------------------------------------------------- FP8 block checkpoints, native layout


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """The v3 case (decisive) in DeepSeek's FP8 block layout, its plan, and transformers on the dequantized
    weights."""
    from transformers import AutoModelForCausalLM

    from rdnac.testing.deepseek import write_fp8_block_checkpoint

    out = tmp_path_factory.mktemp("fp8")
    model_type, overrides = CASES["v3"]
    make_deepseek(out / "float", model_type, decisive=True, **overrides)
    deq = write_fp8_block_checkpoint(out / "float", out / "ckpt", seed=0)
    shutil.copytree(out / "float", out / "deq", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in deq.items()}, out / "deq" / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(out / "deq", dtype=torch.float32, attn_implementation="eager",
                                                     experts_implementation="eager").eval()
    engine = rdnac.load(rdnac.compile(out / "ckpt", target="cpu", output=out / "plan.msgpack", quiet=True))
    return out, reference, engine


def test_fp8_block_checkpoint_is_in_the_native_layout(fp8):
    out, _, engine = fp8
    tensors = load_file(out / "ckpt" / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.5.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router is not quantized
    assert "modules_to_not_convert" not in json.loads((out / "ckpt" / "config.json").read_text())["quantization_config"]
    graph = engine.plan.graph()
    nodes = {n.name: n for n in graph.nodes}
    assert nodes["layers.0.o_proj"].op == "linear_fp8" and nodes["layers.0.o_proj"].attrs["block_size"] == [128, 128]
    assert nodes["layers.1.router"].op == "linear"
    # the routed experts stay FP8: bits and 128x128 scales stacked as stored (gate rows, then up rows)
    experts = nodes["layers.1.experts"]
    assert experts.op == "moe_experts_fp8_block"
    assert {k: experts.attrs[k] for k in ("fp8_format", "act_scheme", "block_size")} == \
        {"fp8_format": "e4m3fn", "act_scheme": "dynamic_group", "block_size": [128, 128]}
    w13, s13, w2, s2 = (engine.runner.weights[name] for name in experts.inputs[3:7])
    inter = BASE["moe_intermediate_size"]
    assert (w13.dtype, w13.shape, s13.shape) == (torch.float8_e4m3fn, (8, 2 * inter, 45), (8, 2, 1))
    assert (w2.dtype, w2.shape, s2.shape) == (torch.float8_e4m3fn, (8, 45, inter), (8, 1, 1))
    expert5 = "model.layers.1.mlp.experts.5"
    assert torch.equal(w13[5, inter:].view(torch.uint8), tensors[f"{expert5}.up_proj.weight"].view(torch.uint8))
    assert torch.equal(s13[5, 1], tensors[f"{expert5}.up_proj.weight_scale_inv"][0])
    assert torch.equal(w2[5].view(torch.uint8), tensors[f"{expert5}.down_proj.weight"].view(torch.uint8))
    assert graph.weights[experts.inputs[3]].scheme == "fp8-block128x128"


def _check_teacher_forced(engine, reference, what: str) -> None:
    sequence = PROMPT + reference_greedy(reference, PROMPT, 24)
    ours, ref = engine.logits(sequence), reference_logits(reference, sequence)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    print(f"\nDeepSeek-V3 FP8 block (tiny), {what}: teacher-forced top-1 {top1:.1%} over {len(sequence)}, min "
          f"cosine {cosine:.5f}")
    assert top1 >= 0.95, f"{what}: teacher-forced top-1 agreement {top1:.3f}"
    assert cosine >= 0.999, f"{what}: min cosine {cosine:.5f}"


def test_fp8_block_teacher_forced_against_transformers_on_dequantized_weights(fp8):
    _, reference, engine = fp8
    _check_teacher_forced(engine, reference, "cpu plan")


GPU_TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")
GPU_COMPILE = dict(quiet=True, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def fp8_gpu_plans(fp8):
    """The FP8 block checkpoint's plan per GPU target, compiled once on first use."""
    out, _, _ = fp8
    plans = {}

    def get(target: str):
        if target not in plans:
            plans[target] = rdnac.compile(out / "ckpt", target, out / f"{target}.msgpack", **GPU_COMPILE)
        return plans[target]
    return get


def test_fp8_block_sm90_plan_under_the_interpreter_against_transformers(fp8, fp8_gpu_plans):
    """The sm90 plan's own kernels (FP8 block experts: activations quantized per 128 columns, block-scaled
    grouped GEMMs) under the Triton interpreter, in bf16, against transformers on the dequantized weights."""
    _, reference, _ = fp8
    engine = rdnac.load(fp8_gpu_plans("sm90"), interpret=True)
    _check_teacher_forced(engine, reference, "sm90 plan, Triton interpreter")


@pytest.mark.gpu
def test_fp8_block_gpu_plan_with_graphs(fp8, fp8_gpu_plans):
    """The sm90 plan on cuda (decode through CUDA graphs): teacher-forced against transformers on the
    dequantized weights, and the same 16 greedy tokens as the reference interpreter on the same plan graph
    on the GPU."""
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner

    _, reference, _ = fp8
    engine = rdnac.load(fp8_gpu_plans("sm90"), device="cuda")
    _check_teacher_forced(engine, reference, "sm90 plan on cuda")
    interpreter = LLM(ModelRunner(engine.plan, engine.weights, "cuda"))
    params = SamplingParams(max_tokens=16)
    assert engine.generate([PROMPT], params)[0].token_ids == interpreter.generate([PROMPT], params)[0].token_ids


# the FP8 format and activations each target's experts take (gfx942 computes e4m3fnuz; gfx1151 has no FP8 dot)
EXPERT_FORMATS = {"gfx942": ("e4m3fnuz", "dynamic_group", "float8_e4m3fnuz"),
                  "gfx1151": ("e4m3fn", "none", "float8_e4m3fn")}


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_fp8_block_experts_cross_compile_for_target(fp8, fp8_gpu_plans, target):
    """Every target builds the FP8 block experts within its LDS and without spills; gfx942's bits are
    converted to e4m3fnuz (scales doubled), gfx1151 runs them a16w8; `rdnac inspect` shows them."""
    from click.testing import CliRunner

    from rdnac.cli.inspect import summarize
    from rdnac.cli.main import cli
    from rdnac.compiler.build import check_resources
    from rdnac.plans import read_plan
    from rdnac.plans.binaries import KernelBinary

    out, _, cpu = fp8
    path = fp8_gpu_plans(target)
    plan = read_plan(path)
    binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
    assert all(check_resources(b, target) == [] for b in binaries)
    assert "_moe_fp8_block_gemm_kernel" in {b.kernel.split(":")[1] for b in binaries}
    fmt, act, dtype = EXPERT_FORMATS.get(target, ("e4m3fn", "dynamic_group", "float8_e4m3fn"))
    node = next(n for n in plan.body["graph"]["nodes"] if n["name"] == "layers.1.experts")
    assert (node["op"], node["attrs"]["fp8_format"], node["attrs"]["act_scheme"]) == ("moe_experts_fp8_block", fmt, act)
    assert plan.body["graph"]["weights"][node["inputs"][3]]["dtype"] == dtype
    if fmt == "e4m3fnuz":  # the same bits, twice the scale (e4m3fnuz halves each bit pattern's value)
        with safe_open(str(plan.weights_path), framework="pt") as f:
            scale = f.get_tensor(node["inputs"][4])
        assert torch.equal(scale, 2 * cpu.runner.weights[node["inputs"][4]])
    s = summarize(path)
    moe = next(m for m in s["moe"] if m["node"] == "layers.1.experts")
    assert moe["weight_format"] == f"fp8-block128x128 {fmt}, " + ("a16w8" if act == "none" else "w8a8")
    gemms = moe["decode"]["gemms"]
    assert set(gemms) == {"gate_up", "down"} and all(g["spills"] == 0 for g in gemms.values()), gemms
    text = CliRunner().invoke(cli, ["inspect", str(path)], env={"COLUMNS": "240"})  # rich wraps narrower tables
    assert text.exit_code == 0 and f"fp8-block128x128 {fmt}" in text.output, text.output


# ---------------------------------------------------------------- bad input: one line, nothing written


def _rewrite(src, dst, *, config: dict | None = None, convert=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    save_file((convert or (lambda t: t))(tensors), dst / "model.safetensors")
    if config:
        c = json.loads((dst / "config.json").read_text())
        for key, value in config.items():
            if isinstance(value, dict):
                c[key] = {**c[key], **value}
            else:
                c[key] = value
        (dst / "config.json").write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize("what,config,drop,error,message", [
    ("missing weight_scale_inv", None, "model.layers.2.self_attn.kv_b_proj.weight_scale_inv", CheckpointError,
     r"missing tensor model\.layers\.2\.self_attn\.kv_b_proj\.weight_scale_inv \(the fp8-block128x128 weight "
     r"scale of model\.layers\.2\.self_attn\.kv_b_proj\)"),
    ("block size not 128x128", {"quantization_config": {"weight_block_size": [64, 128]}}, None,
     UnsupportedModelError,
     r"config\.json: quantization_config\.weight_block_size requires \[128, 128\].*got \[64, 128\]"),
    ("kv_lora_rank off", {"kv_lora_rank": 16}, None, CheckpointError,
     r"config\.json: kv_lora_rank \+ qk_rope_head_dim \(16 \+ 6 = 22\) requires tensor "
     r"'model\.layers\.0\.self_attn\.kv_a_proj_with_mqa\.weight' with 22 rows; got shape \[24, 45\]; fix kv_lora_rank"),
])
def test_bad_fp8_input_is_one_line_naming_it(fp8, what, config, drop, error, message):
    out, _, _ = fp8
    tag = "bad-" + what.replace(" ", "-")
    src = _rewrite(out / "ckpt", out / tag, config=config,
                   convert=(lambda t: {k: v for k, v in t.items() if k != drop}) if drop else None)
    plan = out / f"{tag}.msgpack"
    with pytest.raises(error, match=message) as info:
        rdnac.compile(src, target="cpu", output=plan, quiet=True)
    assert "\n" not in str(info.value)
    assert not plan.exists() and not plan.with_suffix(".weights.safetensors").exists()
