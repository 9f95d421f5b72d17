"""Tiny random checkpoints written by transformers, and its fp32 reference outputs.

transformers is the independent reference: its modeling code computes the
logits and greedy tokens rdnac's plans must reproduce.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def make_checkpoint(model_type: str, directory: Path, *, seed: int = 0, shard_size: str | None = None,
                    with_tokenizer: bool = True, perturb_std: float = 0.1, **overrides):
    """Write a tiny random `model_type` checkpoint to `directory`; returns the transformers model (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hidden_size=72, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    perturb_norms(model, perturb_std)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if with_tokenizer:
        write_byte_tokenizer(directory, config.vocab_size)
    return model


@torch.no_grad()
def perturb_norms(model, std: float = 0.1) -> None:
    """Add N(0, std) noise to every norm weight: random init leaves them at 1, which would leave the norm
    weights untested. Draws from torch's global generator in parameter order (seed it first)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(torch.randn_like(p) * std)


def write_byte_tokenizer(directory: Path, vocab_size: int, **config) -> None:
    """A small real byte-level BPE tokenizer (vocab fits any tiny model) with a chat template; `config`
    overrides tokenizer_config.json's fields (a family's own chat_template, its bos_token)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(Path(directory) / "tokenizer.json"))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": 256, **config}))


@torch.no_grad()
def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()


def check_logits_match(llm, model, token_ids: list[int], atol: float = 1e-4) -> None:
    """The plan's float32 logits at every position against transformers' (shape, dtype, max abs error)."""
    ours = llm.logits(token_ids)
    ref = reference_logits(model, token_ids)
    assert ours.shape == ref.shape == (len(token_ids), model.config.get_text_config().vocab_size)
    assert ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"max abs logit error {err:.3g}"


@torch.no_grad()
def reference_greedy(model, token_ids: list[int], num_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([token_ids]), max_new_tokens=num_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, min_new_tokens=num_tokens)
    return out[0, len(token_ids):].tolist()
