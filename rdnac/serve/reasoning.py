"""`reasoning_content` for `rdnac serve`: the model's thinking split from its answer.

`<think>` models (Qwen3, DeepSeek-R1): the reasoning is what comes before `</think>` (an opening `<think>`
dropped); DeepSeek-R1's template opens the block in the prompt, so its output holds only the closing tag.
GPT-OSS (harmony) keeps its thinking in the `analysis` channel: that parser lives with the harmony tool
parser in `tools.py`. `split` is a pure function of the text so far, and its pieces only grow as the text
does (a partial tag at the end is held back), so a stream's deltas are differences of two splits.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def uses_think_tags(chat_template: str | None) -> bool:
    return bool(chat_template) and CLOSE in chat_template


def _held(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with (a tag perhaps still arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split(text: str, *, is_open: bool, final: bool) -> tuple[str, str]:
    """(reasoning, content) of the output so far. `is_open`: the prompt ended inside a think block (R1's, or
    Qwen3's template with thinking on, which leaves the tag to the model: either way is handled)."""
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        text, is_open = stripped[len(OPEN):], True
    elif not final and OPEN.startswith(stripped):
        return "", ""  # maybe `<think>` arriving
    if not is_open:
        return "", text
    end = text.find(CLOSE)
    if end >= 0:
        rest = text[end + len(CLOSE):]  # the answer, once it has begun (the blank lines after the tag dropped)
        return text[:end], rest.lstrip("\n") if rest.strip() else ""
    held = 0 if final else _held(text, CLOSE)
    return text[:len(text) - held], ""


class ReasoningStream:
    """Deltas of (reasoning, content) as a stream's text grows."""

    def __init__(self, is_open: bool):
        self.is_open, self.reasoning, self.content = is_open, "", ""

    def push(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = split(text, is_open=self.is_open, final=final)
        delta = reasoning[len(self.reasoning):], content[len(self.content):]
        assert reasoning.startswith(self.reasoning) and content.startswith(self.content)
        self.reasoning, self.content = reasoning, content
        return delta
