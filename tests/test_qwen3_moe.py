"""Qwen3-MoE from HF safetensors against transformers (fp32 on CPU; eager attention and experts).

Tiny random checkpoints at odd sizes (hidden 44, expert intermediate 21 and
19, vocab 300): 8 experts top-2 renormalized with a dense layer from
`mlp_only_layers` and a sliding window shorter than the prompt, with a
tokenizer and a Qwen3-style chat template; 16 experts top-4 not
renormalized with dense layers from `decoder_sparse_step`, tied, sharded,
no tokenizer. transformers' default grouped-GEMM experts fail on such sizes,
so its experts (and attention) run eager. The same checkpoints rewritten in
the stacked and the GPT-OSS (transposed, interleaved) expert layouts give
bit-identical plan weights, biases included; the checkpoint the GPU benchmarks
generate (rdnac.testing.moe) matches too. Bad checkpoints and configs fail
with one line naming the field or tensor, and write nothing. The plans run
under the cpu LLMEngine at concurrency 1, 3 and 17 and behind `rdnac serve`
with the tokens of each request alone; `inspect` counts active experts only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.errors import CheckpointError, RequestError, UnsupportedModelError
from tests.support.cases import built_once, compile_variant
from tests.support.checkpoints import (check_logits_match, perturb_norms, reference_greedy, reference_logits,
                                      write_byte_tokenizer)
from tests.support.same_tokens import check_batched_greedy_matches_alone

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
TOL = 1e-4
BASE = dict(hidden_size=44, intermediate_size=52, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6,
            initializer_range=0.1)  # larger than the default 0.02 so the experts move the logits well past TOL
CASES = {
    # layers: MoE, dense (mlp_only_layers), MoE; window 7 < the 20-token prompt
    "e8-top2-renorm-window": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=21, norm_topk_prob=True,
                                  mlp_only_layers=[1], use_sliding_window=True, sliding_window=7,
                                  tie_word_embeddings=False),
    # layers: dense, MoE, dense (decoder_sparse_step 2); tied; sharded; no tokenizer
    "e16-top4-step2-tied": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=19, norm_topk_prob=False,
                                decoder_sparse_step=2, tie_word_embeddings=True),
}
WINDOWED, BARE = "e8-top2-renorm-window", "e16-top4-step2-tied"
SPARSE_LAYERS = {"e8-top2-renorm-window": [0, 2], "e16-top4-step2-tied": [1]}

# The markup of Qwen3's chat template (turns, a system turn, <think> blocks kept only after the last user
# query, enable_thinking): the features the plan's jinja renderer must share with transformers'.
QWEN3_STYLE_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(found=false, last_query=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and not ns.found %}{%- set ns.found = true %}{%- set ns.last_query = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def make_qwen3_moe(directory, *, seed: int = 0, shard_size: str | None = None, **overrides):
    """A tiny random Qwen3-MoE written by transformers' save_pretrained; returns the fp32 model (eager)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    assert model.config._experts_implementation == "eager" and model.config._attn_implementation == "eager"
    perturb_norms(model)
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    return model


def _build(name: str, root):
    """(name, root, transformers model, loaded cpu plan) of case `name`."""
    has_tokenizer = name == WINDOWED
    model = make_qwen3_moe(root / "ckpt", shard_size=None if has_tokenizer else "40KB", **CASES[name])
    if has_tokenizer:
        write_byte_tokenizer(root / "ckpt", BASE["vocab_size"], chat_template=QWEN3_STYLE_TEMPLATE)
    else:
        assert (root / "ckpt" / "model.safetensors.index.json").exists()
    plan = rdnac.compile(root / "ckpt", target="cpu", output=root / "plan.msgpack", quiet=True)
    return name, root, model, rdnac.load(plan)


checkpoints, case = built_once(_build, sorted(CASES))  # name -> that case, built once per module on first use


@pytest.fixture
def windowed(checkpoints):
    """The case with a sliding window, a tokenizer and a chat template."""
    return checkpoints(WINDOWED)


@pytest.fixture
def bare(checkpoints):
    """The case without tokenizer files."""
    return checkpoints(BARE)


def test_logits_match_transformers(case):
    _, _, model, engine = case
    check_logits_match(engine, model, PROMPT, atol=TOL)


def test_greedy_continuation_matches_transformers(case):
    _, _, model, engine = case
    assert engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids == reference_greedy(model, PROMPT, 24)


def test_graph_mixes_moe_and_dense_layers(case):
    """MoE layers where transformers puts them (router -> route -> experts), GatedMLP elsewhere; routing
    attributes and the decision log from config.json; the window on every layer."""
    name, _, model, engine = case
    c = model.config
    nodes = {n["name"]: n for n in engine.plan.body["graph"]["nodes"]}
    weights = engine.plan.graph().weights
    sparse = [i for i in range(c.num_hidden_layers) if f"layers.{i}.experts" in nodes]
    assert sparse == SPARSE_LAYERS[name]
    assert sparse == [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    e, k, inter = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
    for i in range(c.num_hidden_layers):
        if i in sparse:
            route = nodes[f"layers.{i}.route"]
            assert route["op"] == "moe_route" and route["inputs"] == [f"layers.{i}.router"]
            assert route["attrs"] == {"top_k": k, "scoring": "softmax_topk", "renormalize": c.norm_topk_prob}
            experts = nodes[f"layers.{i}.experts"]
            assert experts["op"] == "moe_experts" and experts["attrs"] == {"act": "silu"}
            assert experts["inputs"][1:3] == [f"layers.{i}.route.0", f"layers.{i}.route.1"]
            w13, w2 = (weights[n] for n in experts["inputs"][3:])
            assert (w13.shape, w2.shape) == ((e, 2 * inter, c.hidden_size), (e, c.hidden_size, inter))
            assert weights[f"model.layers.{i}.mlp.gate.weight"].shape == (e, c.hidden_size)
            assert f"layers.{i}.gate_up_proj" not in nodes
        else:
            assert f"layers.{i}.router" not in nodes
            assert weights[f"model.layers.{i}.mlp.gate_up_proj.weight"].shape == (2 * c.intermediate_size,
                                                                                   c.hidden_size)
    assert {n["attrs"]["sliding_window"] for n in nodes.values() if n["op"] == "attention"} == \
        {c.sliding_window if c.use_sliding_window else 0}
    decisions = engine.plan.body["decisions"]
    routes = [d for d in decisions if d["node"].endswith(".route")]
    assert [d["node"] for d in routes] == [f"layers.{i}.route" for i in sparse]
    assert routes[0]["action"] == f"softmax_topk top-{k} of {e} experts" + (", renormalized" if c.norm_topk_prob
                                                                             else "")
    assert any(d["action"] == "router_aux_loss_coef 0.001 not applied" for d in decisions)


def test_experts_are_the_checkpoint_tensors_stacked(case):
    """w13[e] is expert e's gate rows then up rows, w2[e] its down projection, bit for bit."""
    name, root, model, _ = case
    graph, weights, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    i = SPARSE_LAYERS[name][0]
    experts = model.model.layers[i].mlp.experts  # transformers' in-memory stacked layout
    assert torch.equal(weights[f"model.layers.{i}.mlp.experts.w13"], experts.gate_up_proj)
    assert torch.equal(weights[f"model.layers.{i}.mlp.experts.w2"], experts.down_proj)
    assert "stack" in graph.weights[f"model.layers.{i}.mlp.experts.w13"].source


def test_norm_topk_prob_moves_the_logits(case):
    """Flipping norm_topk_prob leaves transformers' logits by far more than the tolerance: the comparison
    above really exercises the renormalization (and its absence)."""
    name, root, model, _ = case
    flipped = compile_variant(root, "flipped", norm_topk_prob=not model.config.norm_topk_prob)
    err = (flipped.logits(PROMPT) - reference_logits(model, PROMPT)).abs().max().item()
    assert err > 100 * TOL, f"flipping norm_topk_prob moved the logits by only {err:.3g}"


def test_sliding_window_moves_the_logits(windowed):
    name, root, model, _ = windowed
    assert model.config.sliding_window < len(PROMPT)
    unwindowed = compile_variant(root, "unwindowed", use_sliding_window=False)
    err = (unwindowed.logits(PROMPT) - reference_logits(model, PROMPT)).abs().max().item()
    assert err > 100 * TOL, f"dropping the window moved the logits by only {err:.3g}"


@pytest.mark.parametrize("concurrency", [1, 3, 17])
def test_llm_engine_concurrent_greedy_matches_alone(case, concurrency):
    """`concurrency` requests at once under the cpu LLMEngine give each request's tokens alone."""
    _, _, _, engine = case
    prompts = [PROMPT[i % 7:][: 5 + 3 * (i % 5)] + [i + 3] for i in range(concurrency)]
    params = [SamplingParams(max_tokens=4 + i % 5) for i in range(concurrency)]
    check_batched_greedy_matches_alone(engine, prompts, params)


def test_chat_template_renders_as_transformers(windowed):
    from transformers import PreTrainedTokenizerFast

    name, root, _, engine = windowed
    ref_tok = PreTrainedTokenizerFast.from_pretrained(root / "ckpt")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello"},
                {"role": "user", "content": "Bye"}]
    ref = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ref.endswith("<|im_start|>assistant\n") and "say hi" not in ref  # earlier reasoning is dropped
    assert engine.tokenizer.apply_chat_template(messages) == ref
    ids = engine.tokenizer.encode_chat(messages)
    assert ids == ref_tok(ref, add_special_tokens=False)["input_ids"]
    out = engine.generate([ids], SamplingParams(max_tokens=3))[0]
    assert len(out.token_ids) == 3


def test_runs_without_a_tokenizer(bare):
    """The checkpoint without tokenizer files: the plan carries none, runs on token ids, refuses text."""
    name, _, model, engine = bare
    assert engine.plan.body["tokenizer"]["json"] is None and engine.plan.body["chat_template"] is None
    out = engine.generate([list(PROMPT)], SamplingParams(max_tokens=6))[0]
    assert out.token_ids == reference_greedy(model, PROMPT, 6) and out.text == ""
    with pytest.raises(RequestError, match="requires a tokenizer"):
        engine.generate(["hello"], SamplingParams(max_tokens=2))


# ---------------------------------------------------------------- other checkpoint layouts


def _rewrite(root, name: str, convert) -> object:
    """A copy of the checkpoint whose tensors `convert` (dict -> dict) rewrites, in one file."""
    dst = root / name
    shutil.copytree(root / "ckpt", dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted((root / "ckpt").glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(convert(tensors), dst / "model.safetensors")
    return dst


def _stack(tensors: dict, transposed: bool = False, interleaved: bool = False) -> dict:
    """Per-expert tensors -> experts.gate_up_proj / experts.down_proj (transformers' [E, 2I, H] and
    [E, H, I], or GPT-OSS's [E, H, 2I] with gate/up columns interleaved and [E, I, H])."""
    out, prefixes = {}, set()
    for key, t in tensors.items():
        if ".experts." in key:
            prefixes.add(key.split(".experts.")[0] + ".experts")
        else:
            out[key] = t
    for p in prefixes:
        e = sum(1 for k in tensors if k.startswith(p + ".") and k.endswith(".gate_proj.weight"))
        gate = torch.stack([tensors[f"{p}.{j}.gate_proj.weight"] for j in range(e)])
        up = torch.stack([tensors[f"{p}.{j}.up_proj.weight"] for j in range(e)])
        down = torch.stack([tensors[f"{p}.{j}.down_proj.weight"] for j in range(e)])
        gate_up = torch.stack([gate, up], 2).flatten(1, 2) if interleaved else torch.cat([gate, up], 1)
        out[f"{p}.gate_up_proj"] = gate_up.transpose(1, 2).contiguous() if transposed else gate_up
        out[f"{p}.down_proj"] = down.transpose(1, 2).contiguous() if transposed else down
    return out


def test_stacked_expert_layout_gives_the_same_plan(case):
    name, root, _, _ = case
    ref, ref_w, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    graph, weights, decisions = build_graph(read_checkpoint(_rewrite(root, "stacked", _stack)), "float32")
    assert [n.to_dict() for n in graph.nodes] == [n.to_dict() for n in ref.nodes]
    assert weights.keys() == ref_w.keys() and all(torch.equal(weights[k], ref_w[k]) for k in weights)
    assert any("stacked gate_up_proj" in d["reason"] for d in decisions)


def test_gpt_oss_expert_layout_is_transposed_and_deinterleaved(case):
    """The body GPT-OSS reuses: [E, H, 2I] gate/up with alternating columns and [E, I, H] down read as the
    same w13/w2, bit for bit."""
    from rdnac.compiler.frontend import qwen3_moe
    from rdnac.compiler.frontend.blocks import Residual
    from rdnac.compiler.frontend.model import build_model
    from rdnac.compiler.frontend.moe import MoE

    name, root, _, _ = case
    ref, ref_w, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    body = Residual(MoE(layout="stacked_transposed", interleaved=True), ("post_attention_layernorm", "post_norm"),
                    "moe_residual")
    sparse = (qwen3_moe.ATTENTION, body)
    spec = replace(qwen3_moe.QWEN3_MOE, layer_of=lambda c, i: sparse if qwen3_moe.is_sparse(c, i) else qwen3_moe.DENSE)
    ckpt = read_checkpoint(_rewrite(root, "gpt_oss_layout", lambda t: _stack(t, transposed=True, interleaved=True)))
    graph, weights, decisions = build_model(spec, ckpt, "float32")
    assert [n.to_dict() for n in graph.nodes] == [n.to_dict() for n in ref.nodes]
    assert weights.keys() == ref_w.keys() and all(torch.equal(weights[k], ref_w[k]) for k in weights)
    assert any("de-interleaved" in d["reason"] for d in decisions)


# ---------------------------------------------------------------- bad input: one line, nothing written


def _broken(root, name: str, *, config: dict | None = None, convert=None):
    dst = _rewrite(root, name, convert or (lambda t: t))
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _reshape(key):
    return lambda t: {**t, key: torch.zeros(t[key].shape[0] + 1, t[key].shape[1])}


EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


@pytest.mark.parametrize("what,config,convert,error,message", [
    ("top-k over the expert count", {"num_experts_per_tok": 99}, None, UnsupportedModelError,
     r"config\.json: num_experts_per_tok requires 1\.\.num_local_experts \(\d+\) experts per token; got 99"),
    ("missing expert tensor", None, (_drop, 3, "up_proj"), CheckpointError,
     r"missing tensor 'model\.layers\.\d\.mlp\.experts\.3\.up_proj\.weight'"),
    ("wrong expert shape", None, (_reshape, 5, "down_proj"), CheckpointError,
     r"tensor 'model\.layers\.\d\.mlp\.experts\.5\.down_proj\.weight' requires shape \[44, \d+\] from config\.json; "
     r"got \[45, \d+\]"),
    ("unknown activation", {"hidden_act": "relu2"}, None, UnsupportedModelError,
     r"hidden_act 'relu2' is not supported"),
    ("bad decoder_sparse_step", {"decoder_sparse_step": 0}, None, UnsupportedModelError,
     r"config\.json: decoder_sparse_step requires a positive integer; got 0"),
])
def test_bad_input_is_one_line_naming_it(case, what, config, convert, error, message):
    name, root, _, _ = case
    if convert:  # break an expert tensor of the last MoE layer
        make, expert, proj = convert
        convert = make(EXPERT.format(layer=SPARSE_LAYERS[name][-1], expert=expert, proj=proj))
    tag = "bad-" + what.replace(" ", "-")
    src = _broken(root, tag, config=config, convert=convert)
    out = root / f"{tag}.msgpack"
    with pytest.raises(error, match=message) as info:
        rdnac.compile(src, target="cpu", output=out, quiet=True)
    assert "\n" not in str(info.value)
    assert not out.exists() and not out.with_suffix(".weights.safetensors").exists()


def test_inspect_shows_experts_and_counts_active_experts_per_token(case):
    """`rdnac inspect`: each MoE node's experts, top-k and scoring; the weight bytes read per token at
    batch 1 count top-k of E experts (and one embedding row when the logits have their own matrix)."""
    from click.testing import CliRunner

    from rdnac.cli.inspect import summarize
    from rdnac.cli.main import cli

    name, _, model, engine = case
    c = model.config
    s = summarize(engine.plan.path)
    assert [m["node"] for m in s["moe"]] == [f"layers.{i}.experts" for i in SPARSE_LAYERS[name]]
    e, k, inter, hidden = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.hidden_size
    expert_bytes = 4 * e * 3 * inter * hidden  # float32 w13 [E, 2I, H] and w2 [E, H, I]
    for m in s["moe"]:
        assert (m["num_experts"], m["top_k"], m["scoring"], m["renormalize"], m["act"]) == \
            (e, k, "softmax_topk", c.norm_topk_prob, "silu")
        assert (m["expert_bytes"], m["active_expert_bytes"]) == (expert_bytes, expert_bytes * k // e)
    embed_rows = 0 if c.tie_word_embeddings else c.vocab_size - 1
    inactive = len(s["moe"]) * expert_bytes * (e - k) // e
    assert s["weights"]["bytes_per_token"] == s["weights"]["bytes"] - inactive - 4 * embed_rows * hidden
    text = CliRunner().invoke(cli, ["inspect", str(engine.plan.path)])
    assert text.exit_code == 0, text.output
    assert "mixture of experts" in text.output and "(active experts only)" in text.output
    html = engine.plan.path.with_suffix(".html")
    report = CliRunner().invoke(cli, ["inspect", str(engine.plan.path), "--html", str(html)])
    assert report.exit_code == 0 and "moe_experts" in html.read_text(), report.output


def test_fp8_quantize_keeps_the_router_in_float(windowed, tmp_path):
    """--quantize fp8 turns the attention and dense linears into FP8 but not the routers: their logits pick
    experts discretely."""
    from rdnac.plans import read_plan

    _, root, _, _ = windowed
    plan = read_plan(rdnac.compile(root / "ckpt", target="cpu", output=tmp_path / "fp8.msgpack", quiet=True,
                                   quantize="fp8"))
    nodes = {n["name"]: n for n in plan.body["graph"]["nodes"]}
    assert {nodes[f"layers.{i}.router"]["op"] for i in SPARSE_LAYERS[WINDOWED]} == {"linear"}
    assert nodes["layers.1.down_proj"]["op"] == "linear_fp8"
    assert sum(d["reason"].startswith("an MoE router") for d in plan.body["decisions"]) == 2
    llm = rdnac.load(plan.path)
    assert len(llm.generate([PROMPT], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_served_chat_under_concurrency_matches_alone(windowed):
    """`rdnac serve` on the MoE plan (uvicorn on a loopback port, the openai client): 17 concurrent greedy
    chat requests give the text `LLM.generate` gives each alone."""
    import socket
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import uvicorn

    from rdnac.serve.app import create_app
    from rdnac.serve.worker import EngineWorker

    _, _, _, engine = windowed
    served = rdnac.load(engine.plan.path)
    worker = EngineWorker(served.engine)
    worker.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(worker, served, model_name="moe"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        questions = [f"question {i}: {'why ' * (i % 4)}?" for i in range(17)]
        expected = [engine.generate(q, SamplingParams(max_tokens=5), chat=True)[0].text for q in questions]
        assert any(expected)

        def ask(q):
            result = client.chat.completions.create(model="moe", messages=[{"role": "user", "content": q}],
                                                    max_completion_tokens=5, temperature=0)
            return result.choices[0].message.content

        with ThreadPoolExecutor(17) as pool:
            assert list(pool.map(ask, questions)) == expected
    finally:
        server.should_exit = True
        thread.join(10)
        worker.shutdown()


def test_max_window_layers_is_not_read(windowed, tmp_path):
    """transformers 5's Qwen3-MoE windows every layer when use_sliding_window is set (Qwen2's
    max_window_layers is not read): the same graph, and the decision log says so."""
    from transformers import AutoModelForCausalLM

    _, root, model, _ = windowed
    shutil.copytree(root / "ckpt", tmp_path / "mwl")
    config = json.loads((tmp_path / "mwl" / "config.json").read_text())
    config["max_window_layers"] = 1
    (tmp_path / "mwl" / "config.json").write_text(json.dumps(config))
    ref, _, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    graph, _, decisions = build_graph(read_checkpoint(tmp_path / "mwl"), "float32")
    assert [n.to_dict() for n in graph.nodes] == [n.to_dict() for n in ref.nodes]
    assert {n.attrs["sliding_window"] for n in graph.nodes if n.op == "attention"} == {7}
    assert any(d["action"] == "max_window_layers 1 not applied" for d in decisions)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mwl", dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager").eval()
    assert torch.equal(reference_logits(reloaded, PROMPT), reference_logits(model, PROMPT))


@pytest.mark.parametrize("layout", ["per_expert", "stacked_transposed"])
def test_expert_biases_are_stacked_in_the_ir_order(windowed, layout):
    """Expert biases (GPT-OSS has them): per-expert gate/up/down biases, or GPT-OSS's interleaved
    gate_up_proj_bias [E, 2I] and down_proj_bias [E, H], become b13 [E, 2I] (gate, then up) and b2 [E, H]."""
    from rdnac.compiler.frontend import qwen3_moe
    from rdnac.compiler.frontend.blocks import Residual
    from rdnac.compiler.frontend.model import build_model
    from rdnac.compiler.frontend.moe import MoE

    _, root, model, _ = windowed
    c = model.config
    e, inter, hidden = c.num_experts, c.moe_intermediate_size, c.hidden_size
    gen = torch.Generator().manual_seed(1)
    gate_b, up_b, down_b = (torch.randn(e, n, generator=gen) for n in (inter, inter, hidden))
    is_stacked = layout != "per_expert"

    def add_biases(tensors):
        out = _stack(tensors, transposed=True, interleaved=True) if is_stacked else dict(tensors)
        for i in SPARSE_LAYERS[WINDOWED]:
            p = f"model.layers.{i}.mlp.experts"
            if is_stacked:
                out[f"{p}.gate_up_proj_bias"] = torch.stack([gate_b, up_b], 2).flatten(1, 2)
                out[f"{p}.down_proj_bias"] = down_b.clone()
            else:
                for j in range(e):
                    out.update({f"{p}.{j}.gate_proj.bias": gate_b[j].clone(), f"{p}.{j}.up_proj.bias": up_b[j].clone(),
                                f"{p}.{j}.down_proj.bias": down_b[j].clone()})
        return out

    body = Residual(MoE(layout=layout, interleaved=is_stacked, expert_bias=True),
                    ("post_attention_layernorm", "post_norm"), "moe_residual")
    spec = replace(qwen3_moe.QWEN3_MOE, layer_of=lambda cfg, i: (qwen3_moe.ATTENTION, body)
                   if qwen3_moe.is_sparse(cfg, i) else qwen3_moe.DENSE)
    graph, weights, _ = build_model(spec, read_checkpoint(_rewrite(root, f"biased-{layout}", add_biases)), "float32")
    ref, ref_w, _ = build_graph(read_checkpoint(root / "ckpt"), "float32")
    for i in SPARSE_LAYERS[WINDOWED]:
        p = f"model.layers.{i}.mlp.experts"
        assert graph.node(f"layers.{i}.experts").inputs[3:] == [f"{p}.w13", f"{p}.w2", f"{p}.b13", f"{p}.b2"]
        assert torch.equal(weights[f"{p}.w13"], ref_w[f"{p}.w13"]) and torch.equal(weights[f"{p}.w2"], ref_w[f"{p}.w2"])
        assert torch.equal(weights[f"{p}.b13"], torch.cat([gate_b, up_b], 1))
        assert torch.equal(weights[f"{p}.b2"], down_b)


def test_hub_layout_checkpoint_matches_transformers(tmp_path):
    """The checkpoint the GPU benchmarks generate (rdnac.testing.moe, Qwen/Qwen3-30B-A3B's layout and
    config keys: num_experts, rope_theta, bf16 shards; 16 experts top-4): the plan against transformers
    loading the same files."""
    from transformers import AutoModelForCausalLM

    from rdnac.testing.moe import write_random_moe_checkpoint

    ckpt = write_random_moe_checkpoint(tmp_path / "hub", "qwen3-moe-tiny")
    assert "num_experts" in json.loads((ckpt / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    engine = rdnac.load(rdnac.compile(ckpt, target="cpu", output=tmp_path / "hub.msgpack", quiet=True))
    check_logits_match(engine, model, PROMPT, atol=TOL)
    assert engine.generate([PROMPT], SamplingParams(max_tokens=12))[0].token_ids == reference_greedy(model, PROMPT, 12)
