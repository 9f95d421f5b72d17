"""Rebuild a `tokenizers` tokenizer from a GGUF file's tokenizer metadata.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges, token
types and special ids as metadata. `gguf_reader.py` calls `build_tokenizer` to
turn those into the tokenizer.json, tokenizer_config and notes of a
`Checkpoint`. The target is the tokenizer transformers builds when it loads the
same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): same model,
pre-tokenizer, decoder, added tokens and BOS/EOS post-processing, so every text
encodes and decodes identically. Two kinds are supported: "gpt2" (byte-level
BPE with merges) and "llama" (SentencePiece-style BPE with byte fallback,
merges recovered from the scores when the file has none). A "llama" vocabulary
of a Gemma architecture is Gemma's tokenizer: spaces become "▁" in a normalizer
rather than a Metaspace pre-tokenizer, and its merges follow the vocabulary
order, not the scores.

One deliberate difference: transformers also registers the default special
tokens of the class it builds with (`<|endoftext|>`; `<unk>`, `<s>`, `</s>`)
and, when the vocabulary lacks them, appends them as new ids past the
embedding matrix. Here they are added only when the vocabulary has them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from rdnac.errors import CheckpointError, UnsupportedModelError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)

# The split regexes transformers applies for these `tokenizer.ggml.pre` values;
# any other value gets GPT-2's byte-level regex, as in transformers.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}
_GPT2_PRE = (None, "default", "gpt-2", "gpt2")

# Special tokens the transformers classes register by default (GPT2Tokenizer; LlamaTokenizer).
_CLASS_DEFAULTS = {"gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"],
                   "gemma": ["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"]}  # GemmaTokenizer's
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def build_tokenizer(meta: dict, path: Path) -> tuple[str | None, dict, list[str]]:
    """(tokenizer.json text or None, tokenizer_config, notes) from GGUF metadata `meta`."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None, {}, [f"{path.name}: no tokenizer.ggml.model in the GGUF metadata; the checkpoint has no tokenizer"]
    if kind not in ("gpt2", "llama"):
        raise UnsupportedModelError(
            f"{path}: requires tokenizer.ggml.model 'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE); "
            f"got {kind!r}; use a GGUF of a supported model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{path}: requires tokenizer.ggml.tokens in the GGUF metadata; got none; "
                              "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    types = meta.get("tokenizer.ggml.token_type") or []
    notes: list[str] = []
    if kind == "gpt2":
        tok, vocab = _byte_level(meta, tokens, path, notes)
        alphabet = set(bytes_to_unicode().values())
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        skipped = [t for t, ty in zip(tokens, types) if ty == _CONTROL and not set(t) <= alphabet]
        if skipped:
            notes.append(f"{path.name}: {len(skipped)} control token(s) outside the byte alphabet are not special "
                         f"(as in transformers), e.g. {skipped[0]!r}")
    elif meta.get("general.architecture") in _GEMMA_ARCHS:
        kind = "gemma"
        tok, vocab = _gemma(meta, tokens, path)
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    else:
        tok, vocab = _sentencepiece(meta, tokens, path, notes)
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])

    config: dict = {}
    for key, id_key in _SPECIAL_IDS.items():
        token_id = meta.get(f"tokenizer.ggml.{id_key}")
        config[key] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    specials = [t for t in [*_CLASS_DEFAULTS[kind], *config.values()] if t is not None]
    missing = sorted({t for t in specials if t not in vocab})
    if missing:
        notes.append(f"{path.name}: special token(s) {missing} are not in the vocabulary and are not added "
                     "(transformers would append them as new ids past the embedding matrix)")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials if t in vocab])
    # last, as transformers adds them: a user-defined token stays plain even where the class names it special
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind != "gpt2")  # llama.cpp's SentencePiece default
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    # transformers drops the flag when the token is unset; here also when it is not in the vocabulary
    config["add_bos_token"] = bool(add_bos) and config["bos_token"] in vocab
    config["add_eos_token"] = bool(add_eos) and config["eos_token"] in vocab
    config["clean_up_tokenization_spaces"] = False
    tok.post_processor = _post_processor(tok, config)
    return tok.to_str(), config, notes


def _byte_level(meta: dict, tokens: list[str], path: Path, notes: list[str]) -> tuple[Tokenizer, dict]:
    table = bytes_to_unicode()
    alphabet = set(table.values())
    # Tokens written in raw UTF-8 rather than in the byte alphabet are respelled into it.
    vocab = {t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{path}: a 'gpt2' tokenizer requires tokenizer.ggml.merges; got none; "
                              "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_split_merges(merges, path), dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if pre not in _GPT2_PRE:
            notes.append(f"{path.name}: tokenizer.ggml.pre {pre!r} has no split rule here or in transformers; "
                         "pre-tokenizing with GPT-2's byte-level regex, as transformers does "
                         "(llama.cpp and the original tokenizer.json may split digits or spaces differently)")
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _sentencepiece(meta: dict, tokens: list[str], path: Path, notes: list[str]) -> tuple[Tokenizer, dict]:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = _split_merges(merges, path)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{path}: a 'llama' tokenizer requires tokenizer.ggml.merges or one "
                                  f"tokenizer.ggml.scores entry per token; got neither; re-convert the model")
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    if meta.get("tokenizer.ggml.add_space_prefix") is False:
        notes.append(f"{path.name}: tokenizer.ggml.add_space_prefix is false, but the first word still gets a "
                     "'▁' prefix, as in transformers (llama.cpp would not add it)")
    return tok, vocab


def _gemma(meta: dict, tokens: list[str], path: Path) -> tuple[Tokenizer, dict]:
    # A token of spaces only is stored as spaces ("  "); the normalizer turns text spaces into "▁"
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = _split_merges(merges, path)
    else:  # Gemma's scores do not follow its merge order; the vocabulary order does
        pairs = merges_from_scores(vocab, {t: -float(i) for i, t in enumerate(tokens)})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None,
                               unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else "<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, vocab


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two known
    pieces, best score first (ties: shorter left, then shorter right, then vocabulary order)."""
    found = []
    for piece, score in scores.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    # reverse=True keeps equal keys in their original order, as transformers' sort does
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _split_merges(merges: list[str], path: Path) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tokenizer.ggml.merges entries require the form 'left right'; got {bad!r}")
    return pairs


def _post_processor(tok: Tokenizer, config: dict) -> processors.TemplateProcessing:
    """BOS/EOS placement, written exactly as transformers' `update_post_processor` writes it."""
    bos, eos = config["bos_token"], config["eos_token"]
    add_bos, add_eos = config["add_bos_token"], config["add_eos_token"]
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
