"""GPT-OSS (GptOssForCausalLM) on the cpu target against transformers: float checkpoints, the MXFP4
checkpoint layout, `--quantize mxfp4`, the harmony chat template, and bad MXFP4 input.

References: transformers' GptOssForCausalLM in fp32 with eager attention and experts; an MXFP4
checkpoint is loaded by transformers dequantized (Mxfp4Config(dequantize=True)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rdnac
from rdnac import SamplingParams
from rdnac.errors import RdnacError
from rdnac.ir import mxfp4
from rdnac.plans.format import read_plan
from tests.support.checkpoints import check_logits_match, reference_greedy, reference_logits
from tests.support.gpt_oss import make_gpt_oss, reference_model, write_mxfp4_checkpoint
from tests.support.same_tokens import check_batched_greedy_matches_alone

# 26 tokens: longer than every sliding window below (7 and 5), so the windows cut in
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19, 201, 7, 160, 33, 99, 250]

CASES = {
    # 8 experts top-2, YaRN truncate false (GPT-OSS's), sliding window 7, layers slide/full/slide
    "e8-top2": dict(),
    # odd sizes (no MXFP4), 16 experts top-4, bf16 on disk, YaRN with truncate (default true), explicit
    # layer_types, a SwiGLU limit small enough to clamp, window 5
    "e16-top4-odd-bf16": dict(hidden_size=72, intermediate_size=136, num_attention_heads=4, num_key_value_heads=4,
                              num_local_experts=16, num_experts_per_tok=4, sliding_window=5, swiglu_limit=0.75,
                              layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                               "original_max_position_embeddings": 32}, dtype="bf16"),
    # MXFP4-able sizes (K multiples of 32), 16 experts top-4, 2 layers
    "e16-top4-mxfp4": dict(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_local_experts=16,
                           num_experts_per_tok=4, swiglu_limit=1.5),
}
MXFP4_CASES = ("e8-top2", "e16-top4-mxfp4")


@pytest.fixture(scope="module", params=sorted(CASES))
def float_case(request, tmp_path_factory):
    overrides = dict(CASES[request.param])
    dtype = torch.bfloat16 if overrides.pop("dtype", None) == "bf16" else torch.float32
    directory = tmp_path_factory.mktemp(request.param)
    make_gpt_oss(directory / "float", dtype=dtype, **overrides)
    plan = rdnac.compile(directory / "float", target="cpu", output=directory / "float.msgpack")
    return request.param, directory, reference_model(directory / "float"), plan


@pytest.fixture(scope="module", params=MXFP4_CASES)
def mxfp4_case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param + "-mxfp4")
    make_gpt_oss(directory / "float", dtype=torch.bfloat16, **CASES[request.param])
    write_mxfp4_checkpoint(directory / "float", directory / "mxfp4")
    plan = rdnac.compile(directory / "mxfp4", target="cpu", output=directory / "mxfp4.msgpack")
    return request.param, directory, reference_model(directory / "mxfp4"), plan


def _check_logits_and_greedy(plan, model, atol: float) -> None:
    """The plan's logits within atol of transformers', and its 24 greedy tokens transformers'."""
    llm = rdnac.load(plan)
    check_logits_match(llm, model, PROMPT, atol=atol)
    ours = llm.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
    assert ours == reference_greedy(model, PROMPT, 24)


def test_float_logits_and_greedy_match_transformers(float_case):
    _, _, model, plan = float_case
    _check_logits_and_greedy(plan, model, atol=1e-4)


def test_batched_generation_matches_single(float_case):
    _, _, model, plan = float_case
    prompts = [PROMPT[:4], PROMPT, PROMPT[5:17]]
    outs = rdnac.load(plan).generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(model, prompt, 8)


def _logits_with(plan, edit) -> torch.Tensor:
    """The plan's logits over PROMPT after `edit(node)` on every attention node of a private copy of its graph."""
    llm = rdnac.load(plan)
    for node in llm.runner.graph.nodes:
        if node.op == "attention":
            edit(node)
    return llm.logits(PROMPT)


def test_sinks_and_sliding_window_each_move_the_logits(float_case):
    """With the sinks dropped, or the windows removed, the logits leave transformers' by far more than the
    tolerance the full graph meets: both are exercised by the checkpoint and the prompt."""
    _, _, model, plan = float_case
    ref = reference_logits(model, PROMPT)

    def drop_sinks(node):
        assert len(node.inputs) == 8
        node.inputs = node.inputs[:7]

    def no_window(node):
        node.attrs["sliding_window"] = 0

    for edit in (drop_sinks, no_window):
        err = (_logits_with(plan, edit) - ref).abs().max().item()
        assert err > 1e-2, f"{edit.__name__}: logits moved by only {err:.3g}"


def test_graph_structure(float_case):
    """Per layer: norms, q/k/v with biases, rope (YaRN), KV write, attention with sinks and the layer's window,
    o_proj with bias, router linear with bias, moe_route top-k then softmax, experts with the clamped SwiGLU."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    case, directory, model, _ = float_case
    c = model.config
    graph, weights, decisions = build_graph(read_checkpoint(directory / "float"), "float32")
    nodes = {n.name: n for n in graph.nodes}
    layer = ["input_norm", "q_proj", "k_proj", "v_proj", "rope", "kv_write", "attn", "o_proj", "attn_residual",
             "post_norm", "router", "route", "experts", "mlp_residual"]
    assert [n.name for n in graph.nodes] == \
        ["embed", *(f"layers.{i}.{leaf}" for i in range(c.num_hidden_layers) for leaf in layer), "final_norm", "logits"]
    for i, kind in enumerate(c.layer_types):
        attn = nodes[f"layers.{i}.attn"]
        assert attn.inputs[7] == f"model.layers.{i}.self_attn.sinks"
        assert attn.attrs["sliding_window"] == (c.sliding_window if kind == "sliding_attention" else 0)
        assert attn.attrs["scale"] == c.head_dim ** -0.5
        biased = ("q_proj", "k_proj", "v_proj", "o_proj", "router")
        assert all(len(nodes[f"layers.{i}.{p}"].inputs) == 3 for p in biased)
        assert nodes[f"layers.{i}.route"].attrs == {"top_k": c.num_experts_per_tok, "scoring": "topk_softmax"}
        assert nodes[f"layers.{i}.experts"].op == "moe_experts"
        assert nodes[f"layers.{i}.experts"].attrs == {"act": "swiglu_oai", "alpha": c.swiglu_alpha,
                                                       "limit": c.swiglu_limit}
        scaling = nodes[f"layers.{i}.rope"].attrs["scaling"]
        assert scaling["rope_type"] == "yarn"
        assert scaling.get("truncate", True) == c.rope_parameters.get("truncate", True)
    assert any(d["node"] == "layers.0.experts" and "de-interleaved" in d["reason"] for d in decisions)


def test_expert_relayout_is_exact(float_case):
    """w13 rows = gate columns then up columns of gate_up_proj, transposed; w2 = down_proj transposed; bit-exact."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    case, directory, model, _ = float_case
    _, weights, _ = build_graph(read_checkpoint(directory / "float"), "float32")
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach()  # [E, H, 2I], x @ W
    w13 = weights["model.layers.1.mlp.experts.w13"]
    assert w13.shape == (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1])
    assert torch.equal(w13, torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], -1).transpose(1, 2))
    assert torch.equal(weights["model.layers.1.mlp.experts.w2"], experts.down_proj.detach().transpose(1, 2))
    bias = experts.gate_up_proj_bias.detach()
    assert torch.equal(weights["model.layers.1.mlp.experts.b13"], torch.cat([bias[:, ::2], bias[:, 1::2]], -1))


# ------------------------------------------------------------------ MXFP4


def test_mxfp4_logits_and_greedy_match_transformers_dequantized(mxfp4_case):
    _, _, model, plan = mxfp4_case
    _check_logits_and_greedy(plan, model, atol=1e-3)


def test_mxfp4_engine_at_concurrency_17_matches_alone(mxfp4_case):
    """17 requests at once under the cpu LLMEngine (prompts longer and shorter than the window, decode and
    prefill in one step) give each request's tokens alone."""
    _, _, _, plan = mxfp4_case
    llm = rdnac.load(plan)
    prompts = [PROMPT[i % 9:][: 3 + 2 * (i % 8)] + [i + 3] for i in range(17)]
    params = [SamplingParams(max_tokens=2 + i % 3, ignore_eos=True) for i in range(17)]
    check_batched_greedy_matches_alone(llm, prompts, params)


def _plan_weights(plan: Path) -> dict[str, torch.Tensor]:
    return load_file(str(read_plan(plan).weights_path))


def _checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_mxfp4_plan_carries_the_checkpoint_bytes(mxfp4_case):
    """The plan's blocks and e8m0 scales are the checkpoint's bytes: down_proj as stored, gate_up_proj with its
    rows de-interleaved (gate rows, then up rows). A path that zeroed or converted the scales fails here."""
    _, directory, model, plan = mxfp4_case
    ours, ckpt = _plan_weights(plan), _checkpoint_tensors(directory / "mxfp4")
    for i in range(model.config.num_hidden_layers):
        e = f"model.layers.{i}.mlp.experts"
        gu_blocks, gu_scales = ckpt[f"{e}.gate_up_proj_blocks"], ckpt[f"{e}.gate_up_proj_scales"]
        num_experts, rows = gu_scales.shape[:2]
        order = torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])
        assert ours[f"{e}.w13_scales"].dtype == torch.uint8
        assert torch.equal(ours[f"{e}.w13_scales"], gu_scales[:, order])
        assert torch.equal(ours[f"{e}.w13_blocks"], gu_blocks[:, order].reshape(num_experts, rows, -1))
        assert torch.equal(ours[f"{e}.w2_scales"], ckpt[f"{e}.down_proj_scales"])
        assert torch.equal(ours[f"{e}.w2_blocks"], ckpt[f"{e}.down_proj_blocks"].flatten(-2))
        assert len(set(ours[f"{e}.w13_scales"].unique().tolist())) > 1  # real exponents, not one constant


def test_verify_checks_mxfp4_expert_shapes(mxfp4_case):
    """The graph verifier refuses MXFP4 experts whose scales do not fit their blocks, naming the node."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint
    from rdnac.errors import GraphError
    from rdnac.ir.verify import verify

    _, directory, _, _ = mxfp4_case
    graph, _, _ = build_graph(read_checkpoint(directory / "mxfp4"), "float32")
    verify(graph)
    node = next(n for n in graph.nodes if n.op == "moe_experts_mxfp4")
    node.inputs[4], node.inputs[6] = node.inputs[6], node.inputs[4]  # w13_scales <-> w2_scales
    with pytest.raises(GraphError, match=rf"node '{node.name}' \(moe_experts_mxfp4\): w13_scales must be"):
        verify(graph)


def test_generator_writes_the_layout_transformers_reads(mxfp4_case):
    """transformers' dequantized experts equal rdnac.ir.mxfp4's dequantization of the written bytes, and stay
    within MXFP4's error of the float weights: rows are output features, K runs along the 32-element groups."""
    _, directory, model, _ = mxfp4_case
    ckpt = _checkpoint_tensors(directory / "mxfp4")
    float_ckpt = _checkpoint_tensors(directory / "float")
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        theirs = getattr(model.model.layers[0].mlp.experts, proj).detach()  # [E, K, N]
        blocks = ckpt[f"{name}_blocks"]
        ours = mxfp4.dequantize(blocks.flatten(-2), ckpt[f"{name}_scales"]).transpose(1, 2)
        assert torch.equal(theirs, ours)
        w = float_ckpt[name].float()
        rel = ((theirs - w).norm() / w.norm()).item()
        assert rel < 0.15, f"{proj}: relative error {rel:.3f}"


def test_quantize_mxfp4_matches_the_mxfp4_checkpoint(mxfp4_case):
    """`--quantize mxfp4` of the bf16 checkpoint gives the MXFP4 checkpoint's plan weights byte for byte, and its
    logits and greedy tokens match transformers on that checkpoint dequantized."""
    _, directory, model, mxfp4_plan = mxfp4_case
    plan = rdnac.compile(directory / "float", target="cpu", output=directory / "quantized.msgpack", quantize="mxfp4")
    ours, ref = _plan_weights(plan), _plan_weights(mxfp4_plan)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name
    llm = rdnac.load(plan)
    check_logits_match(llm, model, PROMPT, atol=1e-3)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids == \
        reference_greedy(model, PROMPT, 24)
    decisions = read_plan(plan).body["decisions"]
    assert sum(d["pass"] == "quantize_mxfp4" and d["action"].startswith("quantized") for d in decisions) == \
        2 * model.config.num_hidden_layers


def test_quantize_mxfp4_of_an_mxfp4_checkpoint_keeps_its_bytes(mxfp4_case, tmp_path):
    _, directory, _, mxfp4_plan = mxfp4_case
    plan = rdnac.compile(directory / "mxfp4", target="cpu", output=tmp_path / "again.msgpack", quantize="mxfp4")
    ours, ref = _plan_weights(plan), _plan_weights(mxfp4_plan)
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[n], ref[n]) for n in ref)
    assert any(d["pass"] == "quantize_mxfp4" and d["action"] == "nothing to do"
               for d in read_plan(plan).body["decisions"])


def test_quantize_mxfp4_of_qwen3_moe(tmp_path):
    """`--quantize mxfp4` of another family's float experts (Qwen3-MoE, with a dense layer mixed in): only the
    experts change, and the plan matches transformers with each expert weight replaced by its MXFP4 round trip."""
    from tests.test_qwen3_moe import make_qwen3_moe

    model = make_qwen3_moe(tmp_path / "ckpt", hidden_size=64, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                           tie_word_embeddings=False)
    plan = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "plan.msgpack", quantize="mxfp4")
    ops = [n.op for n in read_plan(plan).graph().nodes]
    assert ops.count("moe_experts_mxfp4") == 2 and "moe_experts" not in ops and "linear_fp8" not in ops
    with torch.no_grad():
        for layer in (model.model.layers[0], model.model.layers[2]):
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):  # [E, N, K] rows
                w.copy_(mxfp4.dequantize(*mxfp4.quantize(w)))
    llm = rdnac.load(plan)
    check_logits_match(llm, model, PROMPT, atol=1e-3)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids == \
        reference_greedy(model, PROMPT, 24)


def test_quantize_mxfp4_refuses_what_it_cannot_do(tmp_path):
    """Experts whose K is not a multiple of 32, and a model without experts: one line, nothing written."""
    from tests.support.checkpoints import make_checkpoint

    make_gpt_oss(tmp_path / "odd", with_tokenizer=False, num_hidden_layers=1, **{
        k: v for k, v in CASES["e16-top4-odd-bf16"].items() if k not in ("dtype", "layer_types")})
    make_checkpoint("llama", tmp_path / "dense", with_tokenizer=False)
    expected = {"odd": r"--quantize mxfp4 requires expert weights whose input features are a multiple of 32; "
                       r"model.layers.0.mlp.experts.w13 is \[16, 272, 72\] \(K = 72\)",
                "dense": r"--quantize mxfp4 requires a mixture-of-experts model .* got LlamaForCausalLM"}
    for name, pattern in expected.items():
        out = tmp_path / f"{name}.msgpack"
        with pytest.raises(RdnacError, match=pattern) as e:
            rdnac.compile(tmp_path / name, target="cpu", output=out, quantize="mxfp4")
        assert "\n" not in str(e.value) and not out.exists()


# ------------------------------------------------------------------ chat template


def test_harmony_chat_template_renders_like_transformers(float_case):
    from transformers import PreTrainedTokenizerFast

    from rdnac.errors import RequestError

    _, directory, _, plan = float_case
    llm = rdnac.load(plan)
    ref = PreTrainedTokenizerFast.from_pretrained(directory / "float")
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello.", "thinking": "A greeting."}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "thinking": "Ask the tool.", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
         {"role": "tool", "content": "sunny, 21°C"}],
    ]
    for messages in conversations:
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|start|>system<|message|>You are ChatGPT") and text.endswith("<|start|>assistant")
        assert llm.tokenizer.apply_chat_template(messages) == text
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<|channel|>final<|message|>y"}]
    with pytest.raises(RequestError, match=r"without <\|channel\|> tags"):
        llm.tokenizer.apply_chat_template(bad)
    ids = llm.tokenizer.encode_chat(conversations[0])
    assert ids == ref(ref.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    assert ids[0] == ref.convert_tokens_to_ids("<|start|>")


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    make_gpt_oss(directory / "float", dtype=torch.bfloat16, with_tokenizer=False, num_hidden_layers=2)
    return write_mxfp4_checkpoint(directory / "float", directory / "mxfp4")


def _edit_tensor(directory: Path, name: str, new: torch.Tensor | None) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(str(shard))
    if new is None:
        del tensors[name], index["weight_map"][name]
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, str(shard))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if key == "quant_method":
            config["quantization_config"]["quant_method"] = value
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


SCALES = "model.layers.1.mlp.experts.down_proj_scales"


def _nan_scale(directory: Path) -> None:
    scales = load_file(str(directory / json.loads((directory / "model.safetensors.index.json").read_text())
                           ["weight_map"][SCALES]))[SCALES].clone()
    scales[3, 5, 1] = 255
    _edit_tensor(directory, SCALES, scales)


BAD = {
    "missing-scales": (lambda d: _edit_tensor(d, SCALES, None), rf"missing tensor '{SCALES}'"),
    "scale-shape": (lambda d: _edit_tensor(d, "model.layers.0.mlp.experts.gate_up_proj_scales",
                                           torch.full((8, 320, 2), 127, dtype=torch.uint8)),
                    r"'model.layers.0.mlp.experts.gate_up_proj_scales' requires shape \[8, 320, 3\] to match "
                    r"'model.layers.0.mlp.experts.gate_up_proj_blocks' \[8, 320, 3, 16\]; got \[8, 320, 2\]"),
    "nan-scale": (_nan_scale, rf"'{SCALES}' holds 1 e8m0 scale byte\(s\) 255 \(NaN\), first at \[3, 5, 1\]"),
    "top-k": (lambda d: _edit_config(d, num_experts_per_tok=9),
              r"num_experts_per_tok requires 1..num_local_experts \(8\) experts per token; got 9"),
    "no-quantization-config": (lambda d: _edit_config(d, quantization_config=None),
                               r"tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks' is MXFP4 data, which "
                               r"requires quantization_config quant_method mxfp4 .*; got no quantization_config"),
    "quant-method": (lambda d: _edit_config(d, quant_method="mxfp6"),
                     r"quantization_config.quant_method 'mxfp6' is not supported; supported: .*mxfp4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mxfp4_input_is_one_line_and_writes_nothing(case, mxfp4_dir, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(mxfp4_dir, broken)
    edit, pattern = BAD[case]
    edit(broken)
    out = tmp_path / "plan.msgpack"
    with pytest.raises(RdnacError, match=pattern) as e:
        rdnac.compile(broken, target="cpu", output=out)
    assert "\n" not in str(e.value)
    assert list(tmp_path.glob("plan*")) == []


# ------------------------------------------------------------------ RoPE and config forms


def test_yarn_of_the_real_config_matches_transformers():
    """GPT-OSS-20B's YaRN (factor 32 over 4096 positions, beta 32/1, truncate false, base 150000, head_dim 64):
    rdnac's inverse frequencies and cos/sin factor equal transformers' bit for bit, and truncate changes them."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from rdnac.compiler.frontend.gpt_oss import DEFAULTS, attention_layers
    from rdnac.ir.rope_math import rope_inv_freq

    config = GptOssConfig()  # the 20B/120B defaults: yarn, truncate false
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = attention_layers(dict(DEFAULTS), 64, Path("config.json"))[0].rope
    ours, our_factor = rope_inv_freq(rope["rotary_dim"], rope["theta"], rope["scaling"])
    assert rope["scaling"]["truncate"] is False and rope["theta"] == config.rope_parameters["rope_theta"]
    assert torch.equal(ours, theirs) and our_factor == their_factor
    truncated, _ = rope_inv_freq(rope["rotary_dim"], rope["theta"], {**rope["scaling"], "truncate": True})
    assert not torch.equal(truncated, ours)


def test_hub_config_form_builds_the_same_graph(float_case, tmp_path):
    """The Hub's config.json (transformers v4: rope_theta + rope_scaling, no rope_parameters) gives the graph the
    v5 form gives."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    case, directory, _, _ = float_case
    v4 = tmp_path / "v4"
    shutil.copytree(directory / "float", v4)
    config = json.loads((v4 / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (v4 / "config.json").write_text(json.dumps(config))
    graphs = [build_graph(read_checkpoint(d), "float32")[0] for d in (directory / "float", v4)]
    assert [(n.op, n.attrs) for n in graphs[0].nodes] == [(n.op, n.attrs) for n in graphs[1].nodes]


def test_gpu_machine_generator_checkpoint_matches_transformers(tmp_path):
    """rdnac.testing.moe's GPT-OSS (the GPU benchmarks' MXFP4 checkpoints, random blocks and scales, the Hub's
    v4 config form) at its tiny shape compiles and matches transformers dequantizing it."""
    from rdnac.testing.moe import write_random_moe_checkpoint

    directory = write_random_moe_checkpoint(tmp_path / "ckpt", "gpt-oss-tiny", "mxfp4")
    llm = rdnac.load(rdnac.compile(directory, target="cpu", output=tmp_path / "plan.msgpack"))
    check_logits_match(llm, reference_model(directory), PROMPT[:12], atol=1e-3)
