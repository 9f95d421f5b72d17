"""FP8 checkpoints end to end on the cpu target, against transformers running the dequantized model (fp32).

The FP8 checkpoints are written by `rdnac.testing.fp8` from tiny random transformers checkpoints, in the
real layouts: HF `fp8` per-tensor (dynamic, static, static declared without scales) and block-128, and
compressed-tensors per-channel. Two comparisons per checkpoint:

- the cpu plan (w8a8: activations quantized to FP8 as the checkpoint says) against transformers on the
  dequantized weights: logits within LOGIT_TOL of the logits' spread, teacher-forced top-1 agreement over 64
  positions >= 90%;
- the same graph with activations left in float (the a16w8 layout fp8_layout makes for gfx1151): within 1e-4,
  which isolates the weight and scale handling from activation-quantization noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.compiler.passes import CompileState, fp8_layout

# These tests follow each checkpoint linear to its FP8 scheme node by node, so they compile without
# merge_linears; tests/test_merge_linears.py covers merged FP8 linears.
UNMERGED = ("merge_linears",)
from rdnac.errors import CheckpointError
from rdnac.ir import interpreter
from rdnac.ir.fp8 import FP8_MAX, dequantize_weight
from rdnac.ir.verify import verify
from rdnac.plans import read_plan
from rdnac.targets.probe import Capabilities, DotProbe
from rdnac.testing.fp8 import write_fp8_checkpoint, write_random_checkpoint
from tests.support.checkpoints import make_checkpoint, perturb_norms, write_byte_tokenizer

VOCAB = 300
PROMPT = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(1)).tolist()
TINY = dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            vocab_size=VOCAB)  # hidden a multiple of 128; intermediate 320 leaves a partial 128-block
LOGIT_TOL = 0.35  # max |logit error| / std(reference logits): FP8 activations, 14 quantized linears
EXACT_TOL = 1e-4  # a16w8: only float32 rounding differs from the dequantized reference
AGREEMENT = 0.90

# name -> (family, scheme, writer options); "calibrate" writes static input scales measured on PROMPT
CASES = {
    "llama-fp8-tensor-dynamic": ("llama", "fp8-tensor", {}),
    "llama-fp8-tensor-static": ("llama", "fp8-tensor", {"calibrate": True}),
    "qwen3-fp8-tensor-static-declared": ("qwen3", "fp8-tensor-static-declared", {"scale_names": "transformers"}),
    "qwen3-fp8-block": ("qwen3", "fp8-block", {}),
    "llama-fp8-block-uint8": ("llama", "fp8-block", {"store_as": "uint8"}),
    "qwen3-compressed-tensors-channel": ("qwen3", "compressed-tensors-channel",
                                         {"ignore": ["model.layers.1.mlp.down_proj"]}),
}


def fake_capabilities(target: str, is_native: bool) -> Capabilities:
    """What the probe would report, without trial-compiling (the pass's logic is under test, not the probe)."""
    fp8 = DotProbe("fp8e4nv", True, ("v_mfma_f32_32x32x16_fp8_fp8",) if is_native else ("v_wmma_f32_16x16x16_f16",))
    return Capabilities(target, "test", DotProbe("bf16", True), (("e4m3fn", fp8), ("e4m3fnuz", fp8)),
                        DotProbe("i8", True), 65536, "target table")


def run_graph(graph, weights, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of one prefill of `token_ids` through the reference interpreter."""
    a, num_tokens, block = graph.attrs, len(token_ids), 16
    num_blocks = -(-num_tokens // block)
    inputs = {"token_ids": torch.tensor(token_ids), "positions": torch.arange(num_tokens),
              "slot_mapping": torch.arange(num_tokens), "logits_indices": torch.arange(num_tokens),
              "block_tables": torch.arange(num_blocks, dtype=torch.int32)[None],
              "seq_lens": torch.tensor([num_tokens], dtype=torch.int32),
              "cu_seqlens_q": torch.tensor([0, num_tokens], dtype=torch.int32)}
    for i in range(a["num_layers"]):
        for kv in "kv":
            inputs[f"{kv}_cache.{i}"] = torch.zeros(num_blocks, block, a["num_kv_heads"], a["head_dim"])
    return interpreter.run(graph, weights, inputs)["logits"]


@torch.no_grad()
def reference_logits(float_dir: Path, weights: dict[str, torch.Tensor], work: Path, model_class=None) -> torch.Tensor:
    """transformers on `weights` (checkpoint names, float32), loaded like a checkpoint so wrappers' renames apply."""
    from transformers import AutoModelForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(work / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copyfile(float_dir / "config.json", work / "config.json")
    model = (model_class or AutoModelForCausalLM).from_pretrained(work, dtype=torch.float32).eval()
    return model(input_ids=torch.tensor([PROMPT])).logits[0].float()


@torch.no_grad()
def calibrate_input_scales(float_dir: Path, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Static input scales amax/448 of every decoder linear's input on PROMPT (what a calibration tool does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    model.load_state_dict(weights)
    amax: dict[str, float] = {}
    hooks = [module.register_forward_pre_hook(
        lambda _m, args, name=name: amax.__setitem__(name + ".weight", args[0].abs().max().item()))
        for name, module in model.named_modules() if name.endswith("_proj")]
    model(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    return {name: value / FP8_MAX["e4m3fn"] for name, value in amax.items()}


def compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |error| / std(ref), teacher-forced top-1 agreement)."""
    assert ours.shape == ref.shape == (len(PROMPT), VOCAB)
    assert ours.dtype == torch.float32
    rel = ((ours - ref).abs().max() / ref.std()).item()
    return rel, (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    out = {}
    for family in ("llama", "qwen3"):
        out[family] = (root / family, make_checkpoint(family, root / family, **TINY))
    return out


@pytest.fixture(scope="module")
def fp8_cases(float_checkpoints, tmp_path_factory):
    """case name -> (FP8 checkpoint dir, reference logits [64, V], cpu plan path), built on first use."""
    built: dict[str, tuple[Path, torch.Tensor, Path]] = {}

    def get(name: str) -> tuple[Path, torch.Tensor, Path]:
        if name not in built:
            family, scheme, options = CASES[name]
            options = dict(options)
            float_dir, _ = float_checkpoints[family]
            root = tmp_path_factory.mktemp(name)
            if options.pop("calibrate", False):
                first = write_fp8_checkpoint(float_dir, root / "uncalibrated", scheme, seed=3)
                options["input_scales"] = calibrate_input_scales(float_dir, first)
            deq = write_fp8_checkpoint(float_dir, root / "fp8", scheme, seed=3, **options)
            ref = reference_logits(float_dir, deq, root / "reference")
            built[name] = (root / "fp8", ref, rdnac.compile(root / "fp8", target="cpu", output=root / "fp8.msgpack",
                                                                   disable_passes=UNMERGED))
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_plan_matches_dequantized_transformers(fp8_cases, name):
    _, ref, plan = fp8_cases(name)
    rel, agreement = compare(rdnac.load(plan).logits(PROMPT), ref)
    print(f"\n{name}: max |logit error| {rel:.3f} x std, top-1 agreement {agreement:.1%} over {len(PROMPT)}")
    assert rel <= LOGIT_TOL, f"{name}: max logit error {rel:.3f} x std > {LOGIT_TOL}"
    assert agreement >= AGREEMENT, f"{name}: top-1 agreement {agreement:.1%} < {AGREEMENT:.0%}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_exact_with_float_activations(fp8_cases, name):
    directory, ref, _ = fp8_cases(name)
    graph, weights, _ = build_graph(read_checkpoint(directory), "float32")
    fp8_layout.run(CompileState(graph, weights, "gfx1151", capabilities=fake_capabilities("gfx1151", False)))
    verify(graph)
    assert {n.attrs["act_scheme"] for n in graph.nodes if n.op == "linear_fp8"} == {"none"}
    err = (run_graph(graph, weights, PROMPT) - ref).abs().max().item()
    assert err <= EXACT_TOL, f"{name}: a16w8 logits differ from the dequantized model by {err:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_nodes_follow_the_checkpoint_scheme(fp8_cases, name):
    _, _, plan = fp8_cases(name)
    _, scheme, options = CASES[name]
    body = read_plan(plan).body
    fp8_nodes = [n for n in body["graph"]["nodes"] if n["op"] == "linear_fp8"]
    linears = [n["name"] for n in body["graph"]["nodes"] if n["op"] == "linear"]
    expected_weight = {"fp8-block": "block", "compressed-tensors-channel": "channel"}.get(scheme, "tensor")
    expected_act = {"fp8-block": "dynamic_group"}.get(scheme, "static" if options.get("calibrate") else "dynamic_token")
    assert len(fp8_nodes) == 14 - len(linears)
    assert linears == (["layers.1.down_proj"] if options.get("ignore") else [])
    for n in fp8_nodes:
        a = n["attrs"]
        act = a["act_scheme"]
        if act == "prequantized":  # quantized by the norm or activation before it (fuse_*_quant), the same way
            act = "dynamic_group" if a["group"] else "dynamic_token"
        assert (a["weight_scheme"], act, a["fp8_format"]) == (expected_weight, expected_act, "e4m3fn"), n
        assert a["block_size"] == ([128, 128] if expected_weight == "block" else None)
    weights = read_plan(plan).load_weights()
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert weights["lm_head.weight"].dtype == torch.float32  # lm_head stays float (modules_to_not_convert / ignore)


def test_block_size_null_stays_per_tensor(fp8_cases):
    """`weight_block_size: null` is per-tensor even when the scale is named weight_scale_inv (transformers)."""
    directory, _, _ = fp8_cases("qwen3-fp8-tensor-static-declared")
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert "weight_block_size" in config and config["weight_block_size"] is None
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in f.keys()
    graph, weights, _ = build_graph(read_checkpoint(directory), "float32")
    assert {n.attrs["weight_scheme"] for n in graph.nodes if n.op == "linear_fp8"} == {"tensor"}
    assert weights["model.layers.0.self_attn.q_proj.weight_scale"].shape == (1,)


def test_static_declared_without_scales_becomes_dynamic(fp8_cases):
    _, _, plan = fp8_cases("qwen3-fp8-tensor-static-declared")
    decisions = [d for d in read_plan(plan).body["decisions"] if "static declared, no input scale" in d["action"]]
    assert sorted(d["node"] for d in decisions) == sorted(
        f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"))
    assert all("activation_scheme static" in d["reason"] for d in decisions)


def test_uint8_weights_are_reinterpreted_not_converted(fp8_cases):
    directory, _, plan = fp8_cases("llama-fp8-block-uint8")
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert stored.dtype == torch.uint8
    weights = read_plan(plan).load_weights()
    ours = weights["model.layers.0.mlp.down_proj.weight"]
    assert ours.dtype == torch.float8_e4m3fn and torch.equal(ours.view(torch.uint8), stored)
    decisions = read_plan(plan).body["decisions"]
    assert any(d["action"] == "uint8 bits read as float8_e4m3fn" for d in decisions)


def test_fp8_data_without_quantization_config_is_an_error(fp8_cases, tmp_path):
    directory, _, _ = fp8_cases("qwen3-fp8-block")
    shutil.copytree(directory, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*requires a float dtype; got float8_e4m3fn.*"
                                              "no quantization_config"):
        build_graph(read_checkpoint(tmp_path / "ckpt"), "float32")


def test_fp8_lm_head_is_dequantized_once_with_a_decision(fp8_cases, tmp_path):
    """A checkpoint that quantizes lm_head too: the logits op has no FP8 form, so the frontend dequantizes it."""
    from rdnac.compiler.passes.quantize import quantize_weight

    directory, ref, _ = fp8_cases("qwen3-fp8-block")
    shutil.copytree(directory, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bits, scale = quantize_weight(tensors["lm_head.weight"], "block", (128, 128))
    tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = bits, scale
    save_file(tensors, str(path))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = []
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    graph, weights, decisions = build_graph(read_checkpoint(tmp_path / "ckpt"), "float32")
    assert weights["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_scale" not in weights
    assert torch.equal(weights["lm_head.weight"], dequantize_weight(bits, scale, "block", (128, 128)))
    assert any(d["node"] == "lm_head.weight" and d["action"].startswith("dequantized") for d in decisions)


# ---------------------------------------------------------------- gfx942 / gfx1151 weight layouts


@pytest.mark.parametrize("name", ["llama-fp8-tensor-static", "qwen3-fp8-block"])
def test_gfx942_layout_is_e4m3fnuz_with_identical_values(fp8_cases, name):
    directory, ref, _ = fp8_cases(name)
    graph, weights, _ = build_graph(read_checkpoint(directory), "float32")
    before = {k: v.clone() for k, v in weights.items()}
    ctx = CompileState(graph, weights, "gfx942", capabilities=fake_capabilities("gfx942", True))
    fp8_layout.run(ctx)
    verify(graph)
    for node in (n for n in graph.nodes if n.op == "linear_fp8"):
        a = node.attrs
        w, s = node.inputs[1], node.inputs[2]
        assert a["fp8_format"] == "e4m3fnuz" and weights[w].dtype == torch.float8_e4m3fnuz
        assert graph.weights[w].dtype == "float8_e4m3fnuz"
        block = tuple(a["block_size"]) if a["block_size"] else None
        new = dequantize_weight(weights[w], weights[s], a["weight_scheme"], block)
        old = dequantize_weight(before[w], before[s], a["weight_scheme"], block)
        assert new.dtype == old.dtype == torch.float32
        assert torch.equal(new, old), f"{w}: max diff {(new - old).abs().max().item():.3g}"
        if a["act_scheme"] == "static":
            assert torch.equal(weights[node.inputs[3]], before[node.inputs[3]] * 2)
    converted = {d["node"] for d in ctx.decisions if d["action"] == "e4m3fn -> e4m3fnuz bits"}
    assert converted == {n.inputs[1] for n in graph.nodes if n.op == "linear_fp8"}
    # Still the checkpoint's function: activations now round on fnuz's grid (max 240), another realization of
    # the same FP8 noise, so the bound is the logit tolerance (top-1 flips only at near-ties of the tiny model).
    rel, agreement = compare(run_graph(graph, weights, PROMPT), ref)
    print(f"\n{name} gfx942 layout (fnuz activations): max |logit error| {rel:.3f} x std, "
          f"top-1 agreement {agreement:.1%}")
    assert rel <= LOGIT_TOL and agreement >= 0.85, (rel, agreement)


def test_gfx1151_layout_is_a16w8_and_drops_static_scales(fp8_cases):
    directory, _, _ = fp8_cases("llama-fp8-tensor-static")
    graph, weights, _ = build_graph(read_checkpoint(directory), "float32")
    ctx = CompileState(graph, weights, "gfx1151", capabilities=fake_capabilities("gfx1151", False))
    fp8_layout.run(ctx)
    verify(graph)
    assert not [w for w in graph.weights if w.endswith("input_scale")]
    assert not [w for w in weights if w.endswith("input_scale")]
    a16w8 = [d for d in ctx.decisions if d["action"] == "a16w8: activations static -> none"]
    assert len(a16w8) == 14 and all("gfx1151 has no FP8 dot" in d["reason"] for d in a16w8)
    assert all(n.attrs["fp8_format"] == "e4m3fn" for n in graph.nodes if n.op == "linear_fp8")


# ---------------------------------------------------------------- Mistral3 (vision-language wrapper), text only


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("mistral3")
    text = dict(model_type="ministral3", num_hidden_layers=2, max_position_embeddings=32768, **TINY)
    vision = dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=32, image_size=56, patch_size=14)
    config = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    perturb_norms(model)
    model.save_pretrained(root / "float")
    write_byte_tokenizer(root / "float", VOCAB)
    # Ministral-3-8B-Instruct-2512's layout: per-tensor, static declared, no input scales, towers not converted
    deq = write_fp8_checkpoint(root / "float", root / "fp8", "fp8-tensor-static-declared", seed=5,
                               ignore=["model.vision_tower", "model.multi_modal_projector"])
    ref = reference_logits(root / "float", deq, root / "reference", Mistral3ForConditionalGeneration)
    plan = rdnac.compile(root / "fp8", target="cpu", output=root / "fp8.msgpack", disable_passes=UNMERGED)
    return root, ref, plan


def test_mistral3_compiles_text_only_and_matches_its_text_model(mistral3):
    root, ref, plan = mistral3
    with safe_open(str(root / "fp8" / "model.safetensors"), "pt") as f:
        towers = [k for k in f.keys() if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert towers, "the checkpoint must carry the vision tensors"
    decisions = read_plan(plan).body["decisions"]
    ignored = {d["node"]: d["reason"] for d in decisions if d["action"] == "ignored tensor"}
    assert set(towers) <= set(ignored)
    assert all("text model only" in ignored[k] for k in towers)
    assert any("text model only, as Ministral3ForCausalLM" in d["action"] for d in decisions)
    assert read_plan(plan).body["runtime"]["max_model_len"] == 16384  # llama_4_scaling is 1 below 16384
    rel, agreement = compare(rdnac.load(plan).logits(PROMPT), ref)
    print(f"\nmistral3 (ministral3 text): max |logit error| {rel:.3f} x std, top-1 agreement {agreement:.1%}")
    assert rel <= LOGIT_TOL and agreement >= AGREEMENT, (rel, agreement)
    graph, weights, _ = build_graph(read_checkpoint(root / "fp8"), "float32")
    fp8_layout.run(CompileState(graph, weights, "gfx1151", capabilities=fake_capabilities("gfx1151", False)))
    err = (run_graph(graph, weights, PROMPT) - ref).abs().max().item()
    assert err <= EXACT_TOL, f"a16w8 logits differ from the dequantized Mistral3 text model by {err:.3g}"


def test_mistral3_v5_tensor_names_give_the_same_plan(mistral3, tmp_path):
    """transformers 5 saves language_model.model.*; converted Hub checkpoints use model.language_model.*."""
    root, _, plan = mistral3
    renamed = tmp_path / "v5"
    renamed.mkdir()
    with safe_open(str(root / "fp8" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    moves = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    for old, new in moves:
        tensors = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
    save_file(tensors, str(renamed / "model.safetensors"))
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(root / "fp8" / side, renamed / side)
    other = rdnac.compile(renamed, target="cpu", output=tmp_path / "v5.msgpack", disable_passes=UNMERGED)
    assert torch.equal(rdnac.load(other).logits(PROMPT), rdnac.load(plan).logits(PROMPT))


# ---------------------------------------------------------------- compile-time quantization


def test_quantize_fp8_block_on_a_float_checkpoint(float_checkpoints, tmp_path):
    directory, model = float_checkpoints["qwen3"]
    plan = rdnac.compile(directory, target="cpu", output=tmp_path / "q.msgpack", quantize="fp8-block",
                         disable_passes=UNMERGED)
    body = read_plan(plan).body
    ops = [n["op"] for n in body["graph"]["nodes"]]
    assert "linear" not in ops and ops.count("linear_fp8") == 14
    quantized = [d for d in body["decisions"] if d["pass"] == "quantize" and d["action"].startswith("quantized")]
    assert len(quantized) == 14 and all("fp8-block128x128" in d["action"] for d in quantized)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0]
    rel, agreement = compare(rdnac.load(plan).logits(PROMPT), ref)  # against the float model: weight error too
    print(f"\n--quantize fp8-block (qwen3 tiny): max |logit error| {rel:.3f} x std, top-1 agreement {agreement:.1%}")
    assert rel <= LOGIT_TOL and agreement >= AGREEMENT, (rel, agreement)


def test_cli_compile_quantize(float_checkpoints, tmp_path):
    from click.testing import CliRunner

    from rdnac.cli.main import cli

    directory, _ = float_checkpoints["llama"]
    out = tmp_path / "cli.msgpack"
    result = CliRunner().invoke(cli, ["compile", str(directory), "-o", str(out), "--quantize", "fp8", "-q"])
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    assert plan.header["compile_options"]["quantize"] == "fp8"
    assert {n["attrs"]["weight_scheme"] for n in plan.body["graph"]["nodes"] if n["op"] == "linear_fp8"} == {"channel"}
    result = CliRunner().invoke(cli, ["compile", str(directory), "-o", str(out), "--quantize", "int4"])
    assert result.exit_code != 0 and "int4" in result.output


# SmolLM2-135M under --quantize fp8 (w8a8): over the teacher-forced positions FP8 moves logits by a median
# 0.47-0.72 and by 0.40-0.82 at the unquantized top-1 (logit std 5.7-6.5), so a top-2 margin under ~1 is a
# coin flip. Which near-ties flip depends on float rounding in torch's CPU kernels, not on FP8 handling: on
# an AVX2 AMD EPYC the unquantized continuation is the same with ATen's AVX2 and scalar kernels
# (ATEN_CPU_CAPABILITY=default), and both give 35/40, but with margins [0.111, 0.128, 0.256, 0.013, 0.407]
# vs [0.128, 0.256, 0.196, 0.858, 0.013]. The old bounds (36/40, every margin < 0.5) sat inside that noise,
# so a change of CPU alone could fail them; no package is involved (gguf 0.16.3-0.19.0, tokenizers
# 0.19.1-0.23.3 and numpy 1.26.4-2.4.6 give bit-identical weights, prompt text and prompt ids).
SMOLLM2_AGREEMENT = 0.85  # 34/40: one flip of headroom below what both kernel paths give
SMOLLM2_MARGIN = 1.0  # a flip of a token the unquantized model preferred by a logit or more is a real error


@pytest.mark.slow
def test_quantize_fp8_smollm2_greedy_chat(tmp_path):
    """SmolLM2-135M-Instruct: --quantize fp8 against the unquantized cpu plan, 16 greedy chat tokens."""
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
    base = rdnac.load(rdnac.compile("demo:smollm2", target="cpu", output=tmp_path / "bf.msgpack"))
    fp8 = rdnac.load(rdnac.compile("demo:smollm2", target="cpu", output=tmp_path / "fp8.msgpack", quantize="fp8"))
    expected = base.generate(prompts, SamplingParams(max_tokens=16), chat=True)
    ours = fp8.generate(prompts, SamplingParams(max_tokens=16), chat=True)
    num_same = sum(a.token_ids == b.token_ids for a, b in zip(expected, ours))
    # Teacher-forced on the unquantized continuation: where does FP8 pick another token, and how close was it?
    agree, total, flips = 0, 0, []
    for prompt, completion in zip(prompts, expected):
        ids = base.encode_prompt(prompt, chat=True)
        full = ids + completion.token_ids
        ref = base.logits(full)[len(ids) - 1:-1]  # [16, V]
        got = fp8.logits(full)[len(ids) - 1:-1].argmax(-1)
        top2 = ref.topk(2, -1).values
        for i, token in enumerate(completion.token_ids):
            total += 1
            if got[i].item() == token:
                agree += 1
            else:
                flips.append(round((top2[i, 0] - top2[i, 1]).item(), 3))
    print(f"\n--quantize fp8 SmolLM2: {num_same}/3 prompts give the same 16 greedy tokens; teacher-forced top-1 "
          f"agreement {agree}/{total}; unquantized top-2 margins where FP8 differs: {flips}")
    assert "Paris" in ours[0].text
    assert agree / total >= SMOLLM2_AGREEMENT
    assert all(m < SMOLLM2_MARGIN for m in flips), f"FP8 changed a confident token (margins {flips})"


# ---------------------------------------------------------------- the generators


def test_fp8_generator_is_deterministic(float_checkpoints, tmp_path):
    directory, _ = float_checkpoints["qwen3"]
    a = write_fp8_checkpoint(directory, tmp_path / "a", "fp8-block", seed=7)
    b = write_fp8_checkpoint(directory, tmp_path / "b", "fp8-block", seed=7)
    c = write_fp8_checkpoint(directory, tmp_path / "c", "fp8-block", seed=8)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], c[name])  # the seed moves the scales, so the rounding differs


@pytest.mark.parametrize("scheme", [None, "fp8-block", "fp8-tensor"])
def test_random_checkpoint_of_real_layout_compiles(tmp_path, scheme):
    shapes = dict(arch="Qwen3ForCausalLM", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=320,
                  vocab=512)
    write_random_checkpoint(tmp_path / "a", **shapes, scheme=scheme, seed=1)
    write_random_checkpoint(tmp_path / "b", **shapes, scheme=scheme, seed=1)
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes(), shard.name
    plan = rdnac.compile(tmp_path / "a", target="cpu", output=tmp_path / "r.msgpack", disable_passes=UNMERGED)
    logits = rdnac.load(plan).logits(list(range(8)))
    assert logits.shape == (8, 512) and torch.isfinite(logits).all()
    ops = [n["op"] for n in read_plan(plan).body["graph"]["nodes"]]
    assert ops.count("linear_fp8") == (0 if scheme is None else 14)
