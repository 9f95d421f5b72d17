"""Gemma 3 from HF safetensors against transformers (fp32 on CPU, eager attention).

Tiny random checkpoints at odd sizes (hidden 72, 3 query heads on 1 KV head of
24, intermediate 136, vocab 320) with local and global layers, a sliding window
shorter than the prompt, different local and global RoPE bases (the global one
linearly scaled), query_pre_attn_scalar != head_dim, a final logit soft-cap,
tied embeddings; as Gemma3ForCausalLM (with a Gemma chat template) and as the
text model of Gemma3ForConditionalGeneration (untied). Each Gemma feature is
shown to matter: turning it off in the config moves the logits far beyond the
tolerance. `attn_logit_softcapping` is set and, as in transformers' Gemma3
attention, not applied; Gemma 2 (the same blocks, attention soft-capped)
covers the soft-capped attention kernels.

GPU targets: the tiny checkpoints cross-compile for gfx1201, gfx1151, gfx942,
gfx950 and sm90 within LDS and without spills, with the kernels that carry
the Gemma features selected; an sm90 plan's kernels run under the Triton
interpreter against the reference interpreter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.errors import RequestError, UnsupportedModelError
from tests.support.cases import compile_variant
from tests.support.checkpoints import check_logits_match, reference_greedy, reference_logits, write_byte_tokenizer

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
TOL = 1e-4
TEXT = dict(hidden_size=72, intermediate_size=136, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
            head_dim=24, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6, query_pre_attn_scalar=20,
            sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}},
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, initializer_range=0.05, pad_token_id=0,
            bos_token_id=2, eos_token_id=1)
# Gemma's turn markup, as google/gemma-3 ships it in tokenizer_config.json (system turn folded into the first)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _perturb_norms(model) -> None:
    """Gemma initializes norm weights at 0 (scale 1 + w); move them so the norms are exercised, and give the
    layers' outputs (their post norms) a gain of about 4 so the layers, not the sqrt(hidden)-scaled tied
    embedding, decide the next token (else a tiny random model repeats its last token)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3 + (3.0 if ".post_" in name else 0.0))


def make_gemma3(directory, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", **{**TEXT, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    _perturb_norms(model)
    model.save_pretrained(directory)
    return model


def make_gemma3_vlm(directory):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=dict(TEXT), vision_config=vision, mm_tokens_per_image=4,
                          tie_word_embeddings=False, image_token_index=300, boi_token_index=301,
                          eoi_token_index=302)
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    _perturb_norms(model)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    model = make_gemma3(root / "ckpt")
    write_byte_tokenizer(root / "ckpt", TEXT["vocab_size"], chat_template=GEMMA_TEMPLATE, bos_token="<|endoftext|>")
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "gemma3.msgpack", quiet=True)
    return root, model, rdnac.load(plan)


@pytest.fixture(scope="module")
def vlm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-vlm")
    model = make_gemma3_vlm(root / "ckpt")
    write_byte_tokenizer(root / "ckpt", TEXT["vocab_size"])
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "gemma3.msgpack", quiet=True)
    return root, model, rdnac.load(plan)


def _check_logits(engine, model, prompt=PROMPT) -> None:
    assert model.config.get_text_config().vocab_size == TEXT["vocab_size"]
    check_logits_match(engine, model, prompt, atol=TOL)


def test_text_model_logits_match_transformers(text_model):
    _, model, engine = text_model
    assert model.config.tie_word_embeddings and model.config.sliding_window < len(PROMPT)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    _check_logits(engine, model)


def test_text_model_greedy_continuation_matches_transformers(text_model):
    _, model, engine = text_model
    ours = engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids
    ref = reference_greedy(model, PROMPT, 24)
    assert ours == ref
    assert len(set(ref)) > 3, "the continuation moves through the vocabulary"


def test_batched_generation_matches_single(text_model):
    _, model, engine = text_model
    prompts = [PROMPT[:5], PROMPT, PROMPT[3:12]]
    batched = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=10))]
    for prompt, out in zip(prompts, batched):
        assert out == reference_greedy(model, prompt, 10)


def test_conditional_generation_text_model_matches_transformers(vlm_model):
    root, model, engine = vlm_model
    _check_logits(engine, model)
    assert engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids == reference_greedy(model, PROMPT, 24)
    decisions = engine.plan.body["decisions"]
    ignored = {d["node"].split(".")[0 if d["node"].startswith("model.") is False else 1]
               for d in decisions if d["action"] == "ignored tensor"}
    assert {"vision_tower", "multi_modal_projector"} <= ignored
    assert any("text model only, as Gemma3ForCausalLM" in d["action"] for d in decisions)
    # transformers' wrapper returns lm_head's logits uncapped (its Gemma3ForCausalLM caps them); so does the plan
    assert model.config.text_config.final_logit_softcapping == 3.0
    assert "softcap" not in next(n for n in engine.plan.body["graph"]["nodes"] if n["op"] == "logits")["attrs"]
    assert any(d["action"] == "final_logit_softcapping 3.0 not applied" for d in decisions)


def _check_runs_without_a_tokenizer(root, model, engine, tmp_path) -> None:
    """The same checkpoint without its tokenizer files: the same graph and weights; the plan carries no
    tokenizer and runs on token ids (transformers' greedy tokens); text is refused with one clear line."""
    from rdnac.plans import read_plan

    shutil.copytree(root / "ckpt", tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    plan = read_plan(rdnac.compile(tmp_path / "bare", target="cpu", output=tmp_path / "bare.msgpack", quiet=True))
    assert plan.body["tokenizer"]["json"] is None and plan.body["chat_template"] is None
    assert plan.body["graph"] == engine.plan.body["graph"]
    assert plan.header["weights"]["sha256"] == engine.plan.header["weights"]["sha256"]
    bare = rdnac.load(plan.path)  # token ids in, token ids out
    out = bare.generate([list(PROMPT)], SamplingParams(max_tokens=6))[0]
    assert out.token_ids == reference_greedy(model, PROMPT, 6) and out.text == ""
    with pytest.raises(RequestError, match="requires a tokenizer"):
        bare.generate(["hello"], SamplingParams(max_tokens=2))


def test_compiles_and_runs_without_a_tokenizer(text_model, tmp_path):
    _check_runs_without_a_tokenizer(*text_model, tmp_path)


def test_attention_softcap_is_not_applied_and_says_so(text_model):
    _, model, engine = text_model
    assert model.config.attn_logit_softcapping == 2.0  # set, and transformers' logits (matched above) ignore it
    assert {n["attrs"]["softcap"] for n in engine.plan.body["graph"]["nodes"] if n["op"] == "attention"} == {0.0}
    assert any(d["action"] == "attn_logit_softcapping 2.0 not applied" for d in engine.plan.body["decisions"])


def test_chat_template_is_gemmas(text_model):
    from transformers import PreTrainedTokenizerFast

    root, _, engine = text_model
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    ref = PreTrainedTokenizerFast.from_pretrained(root / "ckpt").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert "<start_of_turn>model\n" in ref
    assert engine.tokenizer.apply_chat_template(messages) == ref


@pytest.mark.parametrize("feature,changes", [
    ("sliding window", dict(layer_types=["full_attention"] * 4)),
    ("local rope base", dict(rope_parameters={**TEXT["rope_parameters"],
                                              "sliding_attention": TEXT["rope_parameters"]["full_attention"]})),
    ("query_pre_attn_scalar", dict(query_pre_attn_scalar=24)),
    ("final soft-cap", dict(final_logit_softcapping=None)),
])
def test_each_feature_moves_the_logits(text_model, feature, changes):
    """Without the feature, rdnac's logits leave transformers' by far more than the tolerance: the
    comparison above really exercises it."""
    root, model, _ = text_model
    engine = compile_variant(root, feature.replace(" ", "_"), **changes)
    err = (engine.logits(PROMPT) - reference_logits(model, PROMPT)).abs().max().item()
    assert err > 100 * TOL, f"turning off {feature} moved the logits by only {err:.3g}"


def test_v4_config_form_gives_the_same_graph(text_model, tmp_path):
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (configs on the Hub)
    read as the layer_types / rope_parameters form does."""
    root, _, _ = text_model
    shutil.copytree(root / "ckpt", tmp_path / "v4")
    config = json.loads((tmp_path / "v4" / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        del config[key]
    config.update(rope_theta=10_000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  sliding_window_pattern=2)
    (tmp_path / "v4" / "config.json").write_text(json.dumps(config))
    v5, _, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    v4, _, _ = build_graph(read_checkpoint(tmp_path / "v4"), "float32")
    assert [n.to_dict() for n in v4.nodes] == [n.to_dict() for n in v5.nodes]


def test_graph_carries_gemma_attributes(text_model):
    root, _, _ = text_model
    graph, _, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    by_op: dict[str, list] = {}
    for node in graph.nodes:
        by_op.setdefault(node.op, []).append(node)
    assert len(by_op["rms_norm"]) == 4 * 4 + 1 and all(n.attrs["unit_offset"] for n in by_op["rms_norm"])
    assert len(by_op["head_rms_norm"]) == 2 * 4 and all(n.attrs["unit_offset"] for n in by_op["head_rms_norm"])
    assert [n.attrs["sliding_window"] for n in by_op["attention"]] == [6, 0, 6, 0]
    assert [n.attrs["theta"] for n in by_op["rope"]] == [100.0, 10_000.0, 100.0, 10_000.0]
    assert [n.attrs["scaling"] for n in by_op["rope"]][1] == {"rope_type": "linear", "factor": 2.0}
    assert {(n.attrs["scale"], n.attrs["softcap"]) for n in by_op["attention"]} == {(20 ** -0.5, 0.0)}
    assert {n.attrs["act"] for n in by_op["gated_act"]} == {"gelu_tanh"}
    assert by_op["embedding"][0].attrs["scale"] == float(torch.tensor(72 ** 0.5))
    assert by_op["logits"][0].attrs["softcap"] == 3.0 and by_op["logits"][0].inputs[2] == "model.embed_tokens.weight"
    assert "lm_head.weight" not in graph.weights


def test_bf16_embedding_scale_is_rounded_like_transformers(text_model):
    root, _, _ = text_model
    graph, _, _ = build_graph(read_checkpoint(root / "ckpt"), "bfloat16")
    embed = next(n for n in graph.nodes if n.op == "embedding")
    assert embed.attrs["scale"] == float(torch.tensor(72 ** 0.5).to(torch.bfloat16)) != 72 ** 0.5


def test_unit_offset_norm_and_embedding_round_like_transformers_in_bf16():
    """The IR's Gemma norm and embedding scale give transformers' bfloat16 bits (Gemma3RMSNorm: the weight
    product in float32, cast once; Gemma3TextScaledWordEmbedding: sqrt(hidden) cast to bfloat16 first)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3TextScaledWordEmbedding

    from rdnac.compiler.frontend.gemma3 import GEMMA3
    from rdnac.compiler.frontend.spec import embedding_scale
    from rdnac.ir import ops

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 72, generator=g) * 3).to(torch.bfloat16)
    norm = Gemma3RMSNorm(72, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (torch.randn(72, generator=g) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, norm.weight.data, eps=1e-6, unit_offset=True), norm(x))
        heads = Gemma3RMSNorm(24, eps=1e-6).to(torch.bfloat16)
        heads.weight.data = (torch.randn(24, generator=g) * 0.5).to(torch.bfloat16)
        ours = ops.head_rms_norm(x, heads.weight.data, num_heads=3, head_dim=24, eps=1e-6, unit_offset=True)
        assert torch.equal(ours, heads(x.reshape(9, 3, 24)).reshape(9, 72))
        embed = Gemma3TextScaledWordEmbedding(320, 72, 0, embed_scale=72 ** 0.5)
        embed.weight.data = embed.weight.data.to(torch.bfloat16)  # the float32 scale buffer is cast in forward
        ids = torch.tensor([0, 5, 319, 42])
        assert torch.equal(ops.embedding(ids, embed.weight.data, scale=embedding_scale(GEMMA3, 72, "bfloat16")),
                           embed(ids))


def test_fusion_passes_keep_gemma_attributes(text_model, tmp_path):
    """With FP8 (compile-time --quantize fp8, --fp8-lm-head) every fusion applies to the Gemma graph: the fused
    norms keep unit_offset, the fused activation gelu_tanh, the softcapped lm_head stays unquantized (logged),
    and the fused plan computes the unfused plan's logits bit for bit."""
    from collections import Counter

    root, _, _ = text_model
    fusions = ("fuse_add_rms_norm", "fuse_qk_norm_rope_cache", "fuse_norm_quant", "fuse_act_quant",
               "fuse_attention_quant", "fuse_gated_linear")
    opts = dict(quiet=True, quantize="fp8", fp8_lm_head=True)
    fused = rdnac.load(rdnac.compile(root / "ckpt", "cpu", tmp_path / "fused.msgpack", **opts))
    unfused = rdnac.load(rdnac.compile(root / "ckpt", "cpu", tmp_path / "unfused.msgpack", disable_passes=fusions,
                                       **opts))
    nodes = fused.plan.body["graph"]["nodes"]
    ops = Counter(n["op"] for n in nodes)
    assert ops["rms_norm_quant"] == 2 * 4 and ops["qk_norm_rope_cache"] == 4 and ops["gated_act_quant"] == 4
    norms = [n for n in nodes if n["op"] in ("rms_norm", "rms_norm_quant", "qk_norm_rope_cache")]
    assert len(norms) == 4 * 4 + 1 + 4 and all(n["attrs"]["unit_offset"] is True for n in norms)
    assert sum(len(n["inputs"]) == 3 for n in norms if n["op"] in ("rms_norm", "rms_norm_quant")) == 2 * 4
    assert {n["attrs"]["act"] for n in nodes if n["op"] == "gated_act_quant"} == {"gelu_tanh"}
    assert [(n["attrs"]["sliding_window"], n["attrs"]["scale"]) for n in nodes if n["op"] == "attention"] == \
        [(6, 20 ** -0.5), (0, 20 ** -0.5)] * 2
    assert next(n for n in nodes if n["op"] == "logits")["attrs"] == {"softcap": 3.0}
    assert any(d["action"] == "kept the lm_head in the compute dtype" for d in fused.plan.body["decisions"])
    assert torch.equal(fused.logits(PROMPT), unfused.logits(PROMPT))


def test_unknown_layer_type_is_named(text_model, tmp_path):
    root, _, _ = text_model
    shutil.copytree(root / "ckpt", tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["layer_types"][2] = "chunked_attention"
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        rdnac.compile(tmp_path / "bad", target="cpu", output=tmp_path / "bad.msgpack", quiet=True)
    message = str(info.value)
    assert "layer_types[2]" in message and "'chunked_attention'" in message
    assert str(tmp_path / "bad" / "config.json") in message and "sliding_attention" in message


# ---------------------------------------------------------------- Gemma 2: the same blocks, attention soft-capped


@pytest.fixture(scope="module")
def gemma2_model(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gemma2")
    text = {k: v for k, v in TEXT.items() if k not in ("layer_types", "rope_parameters", "attn_logit_softcapping")}
    # without q/k norm the tiny model's scores are small: a low cap makes the soft-cap matter
    config = AutoConfig.for_model("gemma2", **text, attn_logit_softcapping=0.5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    _perturb_norms(model)
    model.save_pretrained(root / "ckpt")
    write_byte_tokenizer(root / "ckpt", TEXT["vocab_size"])
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "gemma2.msgpack", quiet=True)
    return root, model, rdnac.load(plan)


def test_gemma2_matches_transformers(gemma2_model):
    _, model, engine = gemma2_model
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    _check_logits(engine, model)
    assert engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids == reference_greedy(model, PROMPT, 24)
    attention = [n for n in engine.plan.body["graph"]["nodes"] if n["op"] == "attention"]
    assert [(n["attrs"]["sliding_window"], n["attrs"]["softcap"]) for n in attention] == [(6, 0.5), (0, 0.5)] * 2


def test_gemma2_compiles_and_runs_without_a_tokenizer(gemma2_model, tmp_path):
    _check_runs_without_a_tokenizer(*gemma2_model, tmp_path)


@pytest.mark.parametrize("feature,changes", [("attention soft-cap", dict(attn_logit_softcapping=None)),
                                             ("final soft-cap", dict(final_logit_softcapping=None))])
def test_gemma2_softcaps_move_the_logits(gemma2_model, feature, changes):
    root, model, _ = gemma2_model
    engine = compile_variant(root, feature.replace(" ", "_"), **changes)
    err = (engine.logits(PROMPT) - reference_logits(model, PROMPT)).abs().max().item()
    assert err > 100 * TOL, f"turning off {feature} moved the logits by only {err:.3g}"


# ---------------------------------------------------------------- GPU targets: the kernels carry the features

TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")


def _built(plan) -> set[tuple[str, tuple]]:
    """(kernel function, its Gemma-relevant constexprs) of every binary in the plan."""
    keys = ("UNIT_OFFSET", "HAS_RESIDUAL", "QK_NORM", "ACT", "HAS_SOFTCAP", "HAS_WINDOW")
    return {(k["kernel"].split(":")[1], tuple((c, k["call"]["constexprs"][c]) for c in keys
                                              if c in k["call"]["constexprs"])) for k in plan.body["kernels"]}


@pytest.mark.parametrize("target", TARGETS)
def test_gemma3_kernels_cross_compile(target, text_model, tmp_path):
    """Every kernel fits the target's LDS without spills (test_compile_targets' checks), and the kernels that
    carry Gemma's features are the ones selected and built."""
    from rdnac.plans import read_plan
    from tests.test_compile_targets import _check_plan

    root, _, _ = text_model
    path = rdnac.compile(root / "ckpt", target=target, output=tmp_path / f"g.{target}.msgpack", quiet=True)
    _check_plan(path, target)
    plan = read_plan(path)
    built = _built(plan)
    expected = {("_rms_norm_kernel", (("UNIT_OFFSET", True), ("HAS_RESIDUAL", True))),  # add + norm fused
                ("_rms_norm_kernel", (("UNIT_OFFSET", True), ("HAS_RESIDUAL", False))),  # the post norms
                ("_qk_norm_rope_cache_kernel", (("UNIT_OFFSET", True), ("QK_NORM", True))),
                ("_gemm_kernel", (("HAS_SOFTCAP", True),)),  # logits
                ("_prefill_kernel", (("HAS_SOFTCAP", False), ("HAS_WINDOW", True))),
                ("_prefill_kernel", (("HAS_SOFTCAP", False), ("HAS_WINDOW", False))),
                ("_decode_kernel", (("HAS_SOFTCAP", False), ("HAS_WINDOW", True))),
                ("_decode_kernel", (("HAS_SOFTCAP", False), ("HAS_WINDOW", False)))}
    assert expected <= built, sorted(expected - built)
    assert {k for k in built if k[0] in ("_gemm_gated_kernel", "_gated_act_kernel")} <= \
        {("_gemm_gated_kernel", (("ACT", "gelu_tanh"),)), ("_gated_act_kernel", (("ACT", "gelu_tanh"),))}
    assert ("_gemm_gated_kernel", (("ACT", "gelu_tanh"),)) in built  # decode: the MLP's fused gated GEMM
    nodes = {n["name"]: n for n in plan.body["graph"]["nodes"]}
    assert nodes["embed"]["attrs"]["scale"] == float(torch.tensor(72 ** 0.5).to(torch.bfloat16))
    assert [nodes[f"layers.{i}.qk_norm_rope_cache"]["attrs"]["theta"] for i in range(4)] == [100.0, 1e4, 100.0, 1e4]
    assert nodes["logits"]["attrs"]["softcap"] == 3.0


@pytest.mark.parametrize("target", TARGETS)
def test_gemma2_softcapped_attention_cross_compiles(target, gemma2_model, tmp_path):
    from rdnac.plans import read_plan
    from tests.test_compile_targets import _check_plan

    root, _, _ = gemma2_model
    path = rdnac.compile(root / "ckpt", target=target, output=tmp_path / f"g2.{target}.msgpack", quiet=True)
    _check_plan(path, target)
    built = _built(read_plan(path))
    softcapped = {(kernel, (("HAS_SOFTCAP", True), ("HAS_WINDOW", window)))
                  for kernel in ("_prefill_kernel", "_decode_kernel") for window in (True, False)}
    assert softcapped <= built, sorted(softcapped - built)


def test_gemma3_sm90_plan_kernels_match_the_reference_under_the_interpreter(text_model, tmp_path):
    """The sm90 plan's own kernels under the Triton interpreter against the reference interpreter on the same
    graph; float32, where the kernels round like the reference, so the match is tight."""
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner

    root, _, _ = text_model
    plan = rdnac.compile(root / "ckpt", "sm90", tmp_path / "g.msgpack", quiet=True, dtype="float32", max_model_len=64,
                         max_num_seqs=2, max_num_batched_tokens=32)
    engine = rdnac.load(plan, interpret=True)
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cpu"))
    ours, ref = engine.logits(PROMPT).float(), reference.logits(PROMPT).float()
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs logit error {err:.3g}"
    prompts = [PROMPT, PROMPT[:7]]  # decode steps of a batch of two, through the decode bucket's kernels
    assert [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=4))] == \
        [c.token_ids for c in reference.generate(prompts, SamplingParams(max_tokens=4))]
