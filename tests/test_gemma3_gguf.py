"""Gemma 3 from GGUF files (F32 norms, K-quant and Q8_0 weights) against transformers loading the same file.

Each file is written here the way llama.cpp's convert_hf_to_gguf.py and llama-quantize lay out a
Gemma 3: gguf's own Gemma 3 tensor names, every `*norm.weight` stored as HF's w + 1 in F32, 2-D
weights in the quantized type, a SentencePiece vocabulary with Gemma's special tokens and a chat
template. gguf's Python package cannot quantize the K-types, so `tests/support/kquants.py` writes
their blocks (checked below against gguf's dequantizer). The reference is transformers'
`from_pretrained(dir, gguf_file=...)` in fp32 with eager attention: it dequantizes the same bits.
The file states no query_pre_attn_scalar and no local RoPE base; the models use head_dim 256 and
the 10000 base, where llama.cpp's assumptions and transformers' defaults agree.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.frontend.gguf_reader import read_gguf
from rdnac.errors import CheckpointError, UnsupportedModelError
from tests.support.checkpoints import check_logits_match, reference_greedy
from tests.support.kquants import quantize as quantize_k
from tests.test_gguf_reader import TEXTS, _assert_tokenizer_matches

PIECES = ["\n", "\n\n", "  ", "   ", "▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "▁wor", "t", "h", "e",
          "a", "w", "o", "r", "i", "n", "▁h", "l", "▁he", "ll", "▁hell", "u", "s", "m", "d", "▁user", "user",
          "▁model", "model", "us", "er", "mod", "el", "▁is", "is", "▁2", "2", "+", "?"]
TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
           "<start_of_image>"] + [f"<0x{i:02X}>" for i in range(256)] + list(dict.fromkeys(PIECES)))
TYPES = [3, 3, 3, 2, 3, 4, 3, 3, 4] + [6] * 256 + [1] * len(dict.fromkeys(PIECES))
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                 "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA_TEXTS = TEXTS + ["<start_of_turn>user\nIs 2+2?<end_of_turn>\n<start_of_turn>model\n", "the  wor   hell he",
                       "  two leading", "<bos><eos><pad><mask>[multimodal]x", "user\n\nmodel\n\n\n"]

PROMPT = [2, 300, 277, 301, 282, 269, 290, 266, 271, 309, 40, 112, 275, 273, 298, 281, 6, 289, 300, 7]
SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=256, sliding_window=7, max_position_embeddings=512,
             rms_norm_eps=1e-6)

# llama.cpp file types: every 2-D weight in one type, or Q4_K_M's mix (Q6_K for v, down and the embedding).
QUANTS = {
    "Q4_K": ({}, Q.Q4_K),
    "Q5_K": ({}, Q.Q5_K),
    "Q6_K": ({}, Q.Q6_K),
    "Q8_0": ({}, Q.Q8_0),
    "Q4_K_M": ({"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K}, Q.Q4_K),
}


def make_gemma3(*, tied: bool, seed: int = 0, **overrides):
    """A tiny random Gemma3ForCausalLM (fp32), norms perturbed so the 1 + w convention is exercised.
    Random Gemma models repeat the embedding they were fed (it enters the residual stream scaled by
    sqrt(hidden)); a smaller embedding, larger layers and a larger final norm give varied greedy
    continuations with clear top-1 margins (seed 0: 20 distinct tokens in 24, margins >= 0.016)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(TOKENS), tie_word_embeddings=tied, **{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(0.5 if "embed" in name else 2.0)
        model.model.norm.weight.add_(2.0)
    return model


def write_gemma3_gguf(path, model, types: dict[str, Q], default: Q, *, drop: tuple[str, ...] = (),
                      extra: dict | None = None) -> None:
    """Write `model` as llama.cpp's converter + quantizer would; `drop` leaves out metadata keys."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    kv = {
        "general.name": ("string", "tiny-gemma3"),
        "gemma3.context_length": ("uint32", c.max_position_embeddings),
        "gemma3.embedding_length": ("uint32", c.hidden_size),
        "gemma3.block_count": ("uint32", c.num_hidden_layers),
        "gemma3.feed_forward_length": ("uint32", c.intermediate_size),
        "gemma3.attention.head_count": ("uint32", c.num_attention_heads),
        "gemma3.attention.head_count_kv": ("uint32", c.num_key_value_heads),
        "gemma3.attention.key_length": ("uint32", c.head_dim),
        "gemma3.attention.value_length": ("uint32", c.head_dim),
        "gemma3.rope.freq_base": ("float32", c.rope_parameters["full_attention"]["rope_theta"]),
        "gemma3.attention.layer_norm_rms_epsilon": ("float32", c.rms_norm_eps),
        "gemma3.attention.sliding_window": ("uint32", c.sliding_window),
        "tokenizer.ggml.model": ("string", "llama"),
        "tokenizer.ggml.pre": ("string", "default"),
        "tokenizer.ggml.bos_token_id": ("uint32", 2),
        "tokenizer.ggml.eos_token_id": ("uint32", 1),
        "tokenizer.ggml.unknown_token_id": ("uint32", 3),
        "tokenizer.ggml.padding_token_id": ("uint32", 0),
        "tokenizer.ggml.add_bos_token": ("bool", True),
        "tokenizer.ggml.add_eos_token": ("bool", False),
        "tokenizer.ggml.add_space_prefix": ("bool", False),
        "tokenizer.chat_template": ("string", CHAT_TEMPLATE),
        **(extra or {}),
    }
    for key, (kind, value) in kv.items():
        if key not in drop:
            getattr(w, f"add_{kind}")(key, value)
    w.add_token_list(TOKENS)
    # real Gemma scores do not follow the merge order; neither do these
    w.add_token_scores([float(np.sin(i)) for i in range(len(TOKENS))])
    w.add_token_types(TYPES)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        base = names.get_name(hf.removesuffix(".weight"))
        assert base is not None, hf
        x = tensor.float().numpy()
        if hf.endswith("norm.weight"):
            w.add_tensor(f"{base}.weight", x + np.float32(1.0))  # convert_hf_to_gguf's Gemma norm shift
            continue
        qtype = types.get(base.split(".")[-1], default)
        if qtype == Q.Q8_0:
            w.add_tensor(f"{base}.weight", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(f"{base}.weight", quantize_k(x, qtype), raw_dtype=qtype)
        else:  # an unsupported type, written as random blocks
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.random.default_rng(0).integers(0, 256, (x.shape[0], x.shape[1] // block * size), np.uint8)
            w.add_tensor(f"{base}.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_from_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module", params=sorted(QUANTS))
def case(request, tmp_path_factory):
    types, default = QUANTS[request.param]
    tied = request.param != "Q8_0"  # released Gemma 3 files are tied; one case keeps output.weight
    source = make_gemma3(tied=tied)
    path = tmp_path_factory.mktemp(request.param) / f"tiny-gemma3-{request.param}.gguf"
    write_gemma3_gguf(path, source, types, default)
    model, tokenizer = _hf_from_gguf(path)
    return path, source, read_gguf(path), model, tokenizer


# ---- the K-quant writer itself ----------------------------------------------------------------------

@pytest.mark.parametrize("qtype,levels", [(Q.Q4_K, 15), (Q.Q5_K, 31), (Q.Q6_K, 31)])
def test_kquant_blocks_read_back_by_gguf(qtype, levels):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((24, 768)) * rng.uniform(0.01, 1.0, (24, 1))).astype(np.float32)
    x[3] = 0.0
    raw = quantize_k(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (24, 3 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = gguf.quants.dequantize(raw, qtype).reshape(x.shape)
    # one step of the coarsest sub-block per 256-value block bounds the rounding and the 6/8-bit scales
    blocks = x.reshape(-1, 256)
    span = blocks.max(-1) - np.minimum(blocks.min(-1), 0) if qtype != Q.Q6_K else 2 * np.abs(blocks).max(-1)
    err = np.abs(got - x).reshape(-1, 256).max(-1)
    assert (err <= span / levels + 1e-7).all(), f"max error / step {(err / (span / levels + 1e-12)).max():.3f}"
    assert (got[3] == 0).all()


# ---- (a) the checkpoint equals what transformers loads ----------------------------------------------

def test_config_matches_transformers(case):
    from transformers import Gemma3TextConfig

    _, source, ckpt, model, _ = case
    c, ref = ckpt.config, model.config
    assert c["architectures"] == ["Gemma3ForCausalLM"] and c["model_type"] == ref.model_type == "gemma3_text"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "sliding_window", "layer_types", "query_pre_attn_scalar",
                "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation", "attention_bias",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert c[key] == getattr(ref, key), key
    # the v4 keys (rope_theta, rope_local_base_freq) mean the same per-layer-type RoPE to transformers
    assert Gemma3TextConfig(**c).rope_parameters == ref.rope_parameters
    assert ref.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    # and the source model's: both layer kinds, a window shorter than the prompt
    assert c["layer_types"] == source.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert c["sliding_window"] == 7 < len(PROMPT)
    assert c["rms_norm_eps"] == np.float32(1e-6)


def test_tensors_match_transformers(case):
    _, source, ckpt, model, _ = case
    ref = model.state_dict()
    names = set(ckpt.tensors.names())
    assert not [n for n in names if n.startswith("gguf:")]
    assert names | ({"lm_head.weight"} if ckpt.config["tie_word_embeddings"] else set()) == set(ref)
    for name in sorted(names):
        got = ckpt.tensors.load(name)
        assert ckpt.tensors.spec(name) == ("float32", tuple(ref[name].shape)), name
        assert got.shape == ref[name].shape and got.dtype == torch.float32, name
        if not torch.equal(got, ref[name]):
            pytest.fail(f"{name}: max abs diff {(got - ref[name]).abs().max().item()}")
    # independent of transformers: norms come back as HF's w (the +1 taken out), F32 exact up to the rounding
    for name, expected in source.state_dict().items():
        if name.endswith("norm.weight"):
            err = (ckpt.tensors.load(name) - expected).abs().max().item()
            assert err <= 1e-6, f"{name}: max abs diff {err}"


def test_tokenizer_and_chat_template_match_transformers(case):
    path, _, ckpt, _, tokenizer = case
    _assert_tokenizer_matches(ckpt, tokenizer, GEMMA_TEXTS)
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    assert tok.encode("<start_of_turn>user").ids[:2] == [2, 6]  # BOS, then the turn marker whole
    assert ckpt.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Is 2+2? "}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nIs 2+2?<end_of_turn>\n<start_of_turn>model\n")
    # llama.cpp also stops at <end_of_turn>, which the file names only by its text
    assert ckpt.generation_config["eos_token_id"] == [1, 7]
    assert json.loads(ckpt.tokenizer_json)["normalizer"]["type"] == "Replace"


# ---- (b) the compiled plan against transformers-from-GGUF -------------------------------------------

@pytest.fixture(scope="module")
def compiled(case, tmp_path_factory):
    path, _, _, model, _ = case
    plan = rdnac.compile(path, target="cpu", output=tmp_path_factory.mktemp("plan") / "gemma3.msgpack")
    return model, rdnac.load(plan)


def test_logits_match_transformers(compiled):
    model, engine = compiled
    check_logits_match(engine, model, PROMPT, atol=1e-4)


def test_greedy_continuation_matches_transformers(compiled):
    model, engine = compiled
    ours = engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids
    ref = reference_greedy(model, PROMPT, 24)
    assert len(set(ref)) >= 8, f"the reference repeats itself ({ref}); the test would prove little"
    assert ours == ref


def test_plan_carries_tokenizer_template_and_stop_tokens(case, compiled):
    _, _, _, _, tokenizer = case
    _, engine = compiled
    messages = [{"role": "user", "content": "Is 2+2?"}, {"role": "assistant", "content": "the wor"},
                {"role": "user", "content": "  hell he "}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.tokenizer.apply_chat_template(messages) == text
    assert engine.encode_prompt(messages, chat=True) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.encode_prompt("the wor", chat=False) == tokenizer("the wor")["input_ids"]
    assert engine.tokenizer.eos_token_ids == {1, 7}  # <eos> and <end_of_turn>


# ---- llama.cpp's conventions where the file is silent ------------------------------------------------

def _config_of(tmp_path, drop=(), extra=None, **overrides):
    source = make_gemma3(tied=True, **{"num_hidden_layers": 2, **overrides})
    path = tmp_path / "tiny.gguf"
    write_gemma3_gguf(path, source, {}, Q.Q8_0, drop=drop, extra=extra)
    return read_gguf(path)


def test_llama_cpp_conventions(tmp_path):
    ckpt = _config_of(tmp_path, extra={"gemma3.rope.scaling.type": ("string", "linear"),
                                       "gemma3.rope.scaling.factor": ("float32", 8.0),
                                       "gemma3.final_logit_softcapping": ("float32", 30.0)},
                      num_hidden_layers=12, head_dim=64)
    c = ckpt.config
    assert c["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 2  # every 6th layer is global
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}  # the global layers' only
    assert c["rope_theta"] == 1e6 and c["rope_local_base_freq"] == 10000.0
    assert c["query_pre_attn_scalar"] == 64  # llama.cpp scales by 1/sqrt(head_dim) below 62 layers
    assert c["final_logit_softcapping"] == 30.0 and c["attn_logit_softcapping"] is None
    assert "hidden_act" not in c and c["hidden_activation"] == "gelu_pytorch_tanh"
    assert any("global layers only" in n for n in ckpt.notes)


def test_27b_attention_scale_and_no_window(tmp_path):
    """The 62-layer 27B scales by 1/sqrt(hidden / heads) (its query_pre_attn_scalar 168 in HF);
    a file without a window has no sliding layers."""
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in (("block_count", 62), ("context_length", 128), ("embedding_length", 5376),
                       ("feed_forward_length", 21504), ("attention.head_count", 32),
                       ("attention.head_count_kv", 16), ("attention.key_length", 128)):
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32("gemma3.vocab_size", 8)
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = read_gguf(path)
    assert ckpt.config["query_pre_attn_scalar"] == 168
    assert ckpt.config["layer_types"] == ["full_attention"] * 62 and ckpt.config["sliding_window"] is None
    assert any("sliding_window" in n for n in ckpt.notes)


# ---- bad input: one clear line naming the file and the key or tensor ------------------------------

@pytest.mark.parametrize("key", ["gemma3.attention.layer_norm_rms_epsilon", "gemma3.feed_forward_length",
                                 "gemma3.block_count"])
def test_missing_key(tmp_path, key):
    with pytest.raises(CheckpointError) as e:
        _config_of(tmp_path, drop=(key,))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "tiny.gguf") in msg and key in msg


def test_value_length_mismatch(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        _config_of(tmp_path, extra={"gemma3.attention.value_length": ("uint32", 128)})
    msg = str(e.value)
    assert "\n" not in msg and "tiny.gguf" in msg and "gemma3.attention.value_length" in msg


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq4.gguf"
    write_gemma3_gguf(path, make_gemma3(tied=True, num_hidden_layers=2), {"ffn_up": Q.IQ4_NL}, Q.Q8_0)
    with pytest.raises(UnsupportedModelError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "blk.0.ffn_up.weight (IQ4_NL)" in msg
