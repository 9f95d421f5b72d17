"""The plan's tokenizer: a `tokenizers` tokenizer plus the plan's special tokens.

A plan compiled from a checkpoint without a tokenizer carries none: it takes
token ids and gives token ids (its output text is empty); text prompts and
chat messages are refused with one line saying so.
"""

from __future__ import annotations

from tokenizers import Tokenizer as _HFTokenizer

from rdnac.errors import PlanError, RequestError
from rdnac.runtime.chat import render_chat, token_string

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _parse(tokenizer_json: str) -> _HFTokenizer:
    try:
        return _HFTokenizer.from_str(tokenizer_json)
    except Exception as e:  # the tokenizers package raises a bare Exception for any malformed document
        raise PlanError(f"the plan's tokenizer requires a valid tokenizer.json document; got one that does not "
                        f"parse ({str(e)[:80]}); the plan is corrupt; recompile it from a checkpoint whose "
                        f"tokenizer.json loads") from None


class Tokenizer:
    def __init__(self, tokenizer_json: str | None, config: dict | None, chat_template: str | None,
                 generation_config: dict):
        self._tok = _parse(tokenizer_json) if tokenizer_json is not None else None
        config = config or {}
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {k: token_string(config.get(k)) for k in _SPECIAL_KEYS}
        self.eos_token_ids = self._eos_ids(generation_config)

    def _eos_ids(self, generation_config: dict) -> set[int]:
        ids = generation_config.get("eos_token_id")
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        eos = self.special_tokens["eos_token"]
        if eos is not None and self._tok is not None and self._tok.token_to_id(eos) is not None:
            ids.add(self._tok.token_to_id(eos))
        return ids

    @property
    def has_tokenizer(self) -> bool:
        return self._tok is not None

    def _require(self, what: str) -> _HFTokenizer:
        if self._tok is None:
            raise RequestError(f"{what} requires a tokenizer; got a plan compiled from a checkpoint without one "
                               "(no tokenizer.json); give the prompt as token ids, or recompile from a checkpoint "
                               "that has a tokenizer")
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require("a text prompt").encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return ""  # token ids out only: the plan has no vocabulary to spell them with
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> _HFTokenizer | None:
        """The `tokenizers` tokenizer (None for a plan without one)."""
        return self._tok

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        self._require("a chat prompt")
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt, tools=tools,
                           **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **kwargs) -> list[int]:
        # transformers tokenizes the rendered chat with add_special_tokens=False: the template places them.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs),
                           add_special_tokens=False)
