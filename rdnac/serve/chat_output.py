"""An assistant message out of a chat choice's output: content, reasoning_content and tool_calls.

Which parts a server splits out depends on its chat template: `<think>` templates (Qwen3, DeepSeek-R1)
get reasoning_content (`reasoning.py`); a request with tools gets its calls parsed in the template's
format (`tools.py`); GPT-OSS's harmony channels give both. `ChatOutput` does it for a whole output
(`message`) or, streaming, as deltas of the output so far (`delta`).
"""

from __future__ import annotations

from rdnac.serve import reasoning
from rdnac.serve.tool_scan import CallState, scan_forced
from rdnac.serve.tools import CallDeltas, ToolStream, forced_calls, needs_special_tokens, tool_format


class ChatStyle:
    """What a server's chat template implies for every response."""

    def __init__(self, chat_template: str | None, tokenizer):
        self.tool_format = tool_format(chat_template)
        self.has_think = reasoning.uses_think_tags(chat_template)
        self.tokenizer = tokenizer

    def output(self, prompt_text: str, has_tools: bool, stop_ids: set[int], forced=None) -> ChatOutput:
        """`forced`: a tool_choice that constrains the whole output to a call ("required", or a named one)."""
        if forced is not None:
            return ChatOutput(None, False, False, self.tokenizer, stop_ids, forced)
        fmt = self.tool_format if has_tools or self.tool_format == "harmony" else None
        think = self.has_think and fmt != "harmony"
        return ChatOutput(fmt, think, prompt_text.rstrip().endswith(reasoning.OPEN), self.tokenizer, stop_ids)


class ChatOutput:
    def __init__(self, fmt: str | None, think: bool, is_open: bool, tokenizer, stop_ids: set[int], forced=None):
        self.fmt, self.think, self.tokenizer, self.stop_ids, self.forced = fmt, think, tokenizer, stop_ids, forced
        self.reasoning = reasoning.ReasoningStream(is_open) if think else None
        self.tools = ToolStream(fmt) if fmt else None
        self.forced_calls = CallDeltas()  # a forced call's deltas (the whole output is the call)
        self.visible = ""  # the content part of reasoning's split, as the tool stream has seen it

    def text(self, text: str, token_ids: list[int]) -> str:
        """The output to parse: the released text, or where the format's markers are special tokens, every
        token decoded with them (less a final stop token)."""
        if not needs_special_tokens(self.fmt):
            return text
        ids = list(token_ids)
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def delta(self, text: str, final: bool) -> tuple[dict, bool]:
        """The delta for the output text so far: {reasoning_content?, content?, tool_calls?}, and whether
        it made tool calls (so far)."""
        if self.forced is not None:  # the output is the call
            if final:
                calls = [CallState(c["function"]["name"], c["function"]["arguments"])
                         for c in forced_calls(text, self.forced)]
            else:
                calls = scan_forced(text, False, self.forced)
            entries = self.forced_calls.push(calls)
            return ({"tool_calls": entries} if entries else {}), bool(self.forced_calls.sent)
        delta, reasoning_delta = {}, ""
        content = text
        if self.reasoning is not None:
            reasoning_delta, content_delta = self.reasoning.push(text, final)
            self.visible += content_delta
            content = self.visible
        entries = []
        if self.tools is not None:
            tool_reasoning, content_delta, entries = self.tools.push(content, final)
            reasoning_delta += tool_reasoning
        elif self.reasoning is None:
            content_delta = text[len(self.visible):]
            self.visible = text
        if reasoning_delta:
            delta["reasoning_content"] = reasoning_delta
        if content_delta:
            delta["content"] = content_delta
        if entries:
            delta["tool_calls"] = entries
        return delta, self.tools is not None and bool(self.tools.calls.sent)

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole assistant message: {role, content, reasoning_content?, tool_calls?}."""
        delta, has_calls = self.delta(text, final=True)
        message = {"role": "assistant", "content": self._all("content", delta) or (None if has_calls else "")}
        if self.reasoning is not None or self.fmt == "harmony":
            message["reasoning_content"] = self._all("reasoning_content", delta) or None
        if has_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]]
        return message, has_calls

    def _all(self, key: str, delta: dict) -> str:
        # a fresh ChatOutput gives everything in its one delta
        return delta.get(key, "")
