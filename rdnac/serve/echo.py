"""`echo` on /v1/completions: the prompt before its completion, and its prompt logprobs.

What lm-eval's loglikelihood tasks send (echo, logprobs, max_tokens 0): the logprob of every prompt token
given the tokens before it (the first has none), from one prefill that keeps the logits of every position
(`LLM.logits`: the runner's logits_all step, blocks borrowed from the engine's pool under its lock).
"""

from __future__ import annotations

from typing import Callable

import torch

from rdnac.serve.protocol import completion_logprobs


class Echo:
    """A prompt echoed before its completion: its text, and its legacy logprobs object (None if not asked)."""

    def __init__(self, text: str, logprobs: dict | None):
        self.text, self.logprobs = text, logprobs

    def join(self, completion: dict) -> dict:
        """The prompt's logprobs followed by the completion's, offsets counted from the prompt's start."""
        if self.logprobs is None:
            return completion
        shift = len(self.text)
        top = self.logprobs["top_logprobs"]
        return {"tokens": self.logprobs["tokens"] + completion["tokens"],
                "token_logprobs": self.logprobs["token_logprobs"] + completion["token_logprobs"],
                "top_logprobs": None if top is None else top + (completion["top_logprobs"] or []),
                "text_offset": self.logprobs["text_offset"] + [o + shift for o in completion["text_offset"]]}


def prompt_logprobs(llm, text: str, ids: list[int], num_top: int, token_strings: Callable,
                    top_strings: Callable) -> Echo:
    """The echo of prompt `ids` with its logprobs and `num_top` alternatives per token (0: none)."""
    logprobs = llm.logits(ids)[:-1].log_softmax(dim=-1)  # [T - 1, V] float32: position t scores token t + 1
    chosen = [None] + logprobs.gather(1, torch.tensor(ids[1:], dtype=torch.int64)[:, None])[:, 0].tolist()
    top = None
    if num_top:
        values, top_ids = logprobs.topk(num_top, dim=-1)
        top = [None] + top_strings([list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())])
    return Echo(text, completion_logprobs(token_strings(ids), chosen, top))
