"""Output text, for every entry point (one implementation): incremental detokenization (the text each new
token adds) and stop strings (where the text ends, and what may be released while one could still form)."""

from __future__ import annotations

from rdnac.runtime.tokenizer import Tokenizer

_PROMPT_CONTEXT_TOKENS = 6  # prompt tail the detokenizer starts from, so the first word's spacing is right


class Detokenizer:
    """Incremental decoding: the text a new token adds is decode(window + token) - decode(window), where
    the window starts a few tokens back, so tokenizers that strip or merge at a boundary agree with a
    full decode; text ending in an incomplete UTF-8 sequence waits for the next token."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        if tokenizer.decode(self.ids).endswith("\ufffd"):
            self.ids = []  # a prompt cut inside a character: its bytes must not merge into the output's text
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(is_final=False)

    def flush(self) -> str:
        return self._delta(is_final=True)

    def _delta(self, is_final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (is_final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


def release_text(text: str, num_released: int, delta: str, stops: list[str], is_final: bool) -> tuple[str, int, bool]:
    """Add decoded text `delta`, cut it at the first stop string, release what can no longer start one.
    Returns (text, number of its characters released, whether a stop string was found)."""
    longest = max((len(s) for s in stops), default=0)
    search_from = max(num_released, len(text) - longest + 1)
    text += delta
    hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    if hits:
        text = text[:min(hits)]
        is_final = True
    held = 0
    if not is_final:  # hold back the longest tail that could still grow into a stop string
        held = next((k for k in range(min(longest - 1, len(text) - num_released), 0, -1)
                     if any(s.startswith(text[-k:]) for s in stops)), 0)
    return text, len(text) - held, bool(hits)
