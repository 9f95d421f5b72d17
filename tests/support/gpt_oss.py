"""Tiny random GPT-OSS checkpoints written by transformers, their MXFP4 form, and the references.

    model = make_gpt_oss(directory / "float", num_local_experts=8, num_experts_per_tok=2)
    write_mxfp4_checkpoint(directory / "float", directory / "mxfp4")
    ref = reference_model(directory / "mxfp4")                            # transformers, dequantized

`write_mxfp4_checkpoint` quantizes a float GPT-OSS checkpoint's experts
(transformers' x @ W layout: `mlp.experts.gate_up_proj [E, H, 2I]` with
gate/up columns interleaved, `mlp.experts.down_proj [E, I, H]`) along their
input features with `rdnac.ir.mxfp4.quantize` and writes them as the Hub's
openai/gpt-oss-20b stores them: `*_blocks` uint8 [E, N, K/32, 16] and
`*_scales` uint8 [E, N, K/32] (N output features; gate_up rows stay
interleaved), every other tensor in bf16, sharded with an index, and
config.json with `quantization_config` {quant_method: mxfp4,
modules_to_not_convert: [...]}. (rdnac.testing.moe writes random MXFP4
checkpoints of real shapes for the GPU machine; these tests need the MXFP4
form of one float model.)

The checkpoints carry a byte-level tokenizer with the harmony special tokens
and a harmony chat template (HARMONY_TEMPLATE, written for these tests in
the format GPT-OSS's chat_template.jinja renders: system message with
knowledge cutoff, `strftime_now` date and reasoning effort, a developer
message with instructions and a `functions` namespace, assistant turns on
the analysis/final channels, `raise_exception` on channel tags in content).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdnac.ir.mxfp4 import BLOCK, quantize

HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|call|>"]

HARMONY_TEMPLATE = r"""{#- Harmony (GPT-OSS): kwargs model_identity, reasoning_effort, builtin_tools are optional. -#}
{%- macro ts_type(spec) -%}
    {%- if spec.type == "array" -%}{{- ts_type(spec['items']) if spec['items'] else "any" -}}[]
    {%- elif spec.type in ("number", "integer") -%}number
    {%- elif spec.type == "string" and spec.enum -%}"{{- spec.enum | join('" | "') -}}"
    {%- elif spec.type -%}{{- spec.type -}}
    {%- else -%}any
    {%- endif -%}
{%- endmacro -%}
{%- macro functions_namespace(tools) -%}
    {{- "## functions\n\nnamespace functions {\n\n" -}}
    {%- for tool in tools -%}
        {%- set fn = tool.function if tool.function is defined else tool -%}
        {{- "// " + fn.description + "\n" -}}
        {{- "type " + fn.name + " = " -}}
        {%- if fn.parameters and fn.parameters.properties -%}
            {{- "(_: {\n" -}}
            {%- for name, spec in fn.parameters.properties.items() -%}
                {%- if spec.description -%}{{- "// " + spec.description + "\n" -}}{%- endif -%}
                {{- name -}}{%- if name not in (fn.parameters.required or []) -%}?{%- endif -%}
                {{- ": " + ts_type(spec) -}}
                {%- if spec.default is defined -%}{{- ", // default: " + spec.default | tojson -}}{%- endif -%}
                {{- ",\n" -}}
            {%- endfor -%}
            {{- "}) => any;\n\n" -}}
        {%- else -%}
            {{- "() => any;\n\n" -}}
        {%- endif -%}
    {%- endfor -%}
    {{- "} // namespace functions" -}}
{%- endmacro -%}
{{- "<|start|>system<|message|>" -}}
{{- (model_identity if model_identity is defined
     else "You are ChatGPT, a large language model trained by OpenAI.") + "\n" -}}
{{- "Knowledge cutoff: 2024-06\nCurrent date: " + strftime_now("%Y-%m-%d") + "\n\n" -}}
{{- "Reasoning: " + (reasoning_effort if reasoning_effort is defined else "medium") + "\n\n" -}}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
{%- if tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- "<|end|>" -}}
{%- if messages[0].role in ("developer", "system") -%}
    {%- set developer_message = messages[0].content -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set developer_message = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if developer_message or tools -%}
    {{- "<|start|>developer<|message|>" -}}
    {%- if developer_message -%}{{- "# Instructions\n\n" + developer_message -}}{%- endif -%}
    {%- if tools -%}{{- "\n\n# Tools\n\n" + functions_namespace(tools) -}}{%- endif -%}
    {{- "<|end|>" -}}
{%- endif -%}
{%- set last = namespace(tool_call=none) -%}
{%- for message in loop_messages -%}
    {%- if message.role == "assistant" -%}
        {%- if "<|channel|>" in message.content or "<|channel|>" in (message.thinking or "") -%}
            {{- raise_exception("assistant messages carry the final text in 'content' and the analysis in "
                                "'thinking', without <|channel|> tags") -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {%- set call = message.tool_calls[0].function if message.tool_calls[0].function is defined
                           else message.tool_calls[0] -%}
            {%- if message.thinking -%}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" -}}
            {%- endif -%}
            {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" -}}
            {{- call.arguments | tojson + "<|call|>" -}}
            {%- set last.tool_call = call.name -%}
        {%- elif loop.last and not add_generation_prompt -%}
            {%- if message.thinking -%}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" -}}
            {%- endif -%}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" -}}
        {%- else -%}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" -}}
        {%- endif -%}
    {%- elif message.role == "tool" -%}
        {%- if last.tool_call is none -%}
            {{- raise_exception("a tool message must follow an assistant tool call") -}}
        {%- endif -%}
        {{- "<|start|>functions." + last.tool_call + " to=assistant<|channel|>commentary<|message|>" -}}
        {{- message.content | tojson + "<|end|>" -}}
    {%- elif message.role == "user" -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""

# Small, odd where the format allows: MXFP4 needs hidden and intermediate multiples of 32.
BASE = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            head_dim=64, vocab_size=301, num_local_experts=8, num_experts_per_tok=2, sliding_window=7,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})


def make_gpt_oss(directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True,
                 **overrides):
    """Write a tiny random GptOssForCausalLM to `directory` in `dtype`; returns the transformers model (fp32).

    transformers initializes sinks, router and experts with std 0.02 and expert biases at zero: they are
    scaled up here so sinks, routing, biases and the SwiGLU clamp all change the logits."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("sinks", "router.bias")):
                p.copy_(torch.randn_like(p))
            elif name.endswith("_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith(("gate_up_proj", "down_proj")):
                p.mul_(10.0)
    model.to(dtype).save_pretrained(directory)
    if with_tokenizer:
        write_harmony_tokenizer(directory, config.vocab_size)
    return model.float()


def write_harmony_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with the harmony special tokens, the harmony template, eos <|return|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(HARMONY_SPECIALS)
    assert tok.get_vocab_size() <= vocab_size
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(HARMONY_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>", "model_max_length": 256}))
    ids = {t: tok.token_to_id(t) for t in HARMONY_SPECIALS}
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|startoftext|>"], "eos_token_id": [ids["<|return|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"]}))


def reference_model(directory: Path):
    """transformers' GptOssForCausalLM on `directory` in fp32, eager attention and experts; an MXFP4 checkpoint
    is dequantized (Mxfp4Config(dequantize=True), the only way on cpu)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    config = json.loads((Path(directory) / "config.json").read_text())
    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if "quantization_config" in config else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager", **kwargs).eval()


EXPERT_PROJECTIONS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json")


def _read(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32]) of an x @ W expert weight [E, K, N]."""
    rows = w.float().transpose(1, 2).contiguous()  # [E, N, K]
    e, n, k = rows.shape
    blocks, scales = quantize(rows)
    return blocks.reshape(e, n, k // BLOCK, 16), scales


def write_mxfp4_checkpoint(src: str | Path, out_dir: str | Path, num_shards: int = 2) -> Path:
    """Write the MXFP4 form of the float GPT-OSS checkpoint `src` to `out_dir`; returns `out_dir`."""
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, torch.Tensor] = {}
    for name, t in _read(src).items():
        if name.endswith(EXPERT_PROJECTIONS):
            written[f"{name}_blocks"], written[f"{name}_scales"] = quantize_experts(t)
        else:
            written[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    names = sorted(written)
    shards = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i:05d}-of-{num_shards - 1:05d}.safetensors"
        save_file({n: written[n].contiguous() for n in shard}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(written[n].numel() * written[n].element_size() for n in shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in _SIDE_FILES:
        if (src / side).exists():
            shutil.copy(src / side, out / side)
    return out
