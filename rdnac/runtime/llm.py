"""LLM: the Python API over the one generation loop. `rdnac.load(plan)` returns one.

    llm = rdnac.load("smol.msgpack")
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0.8, seed=1))
    for out in llm.stream("Once upon a time"): print(out.new_text, end="")

Every call submits requests to the LLM's `LLMEngine` (scheduler, block
manager, device sampler), the loop `rdnac run`, `serve` and `bench` use too.
Params a call leaves out are the plan's generation_config defaults
(`default_params`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch

from rdnac.errors import RequestError
from rdnac.runtime.llm_engine import LLMEngine, Prompt, RequestOutput
from rdnac.runtime.model_runner import ModelRunner
from rdnac.runtime.sampling_params import SamplingParams


class LLM:
    def __init__(self, runner: ModelRunner, **engine_options):
        """`engine_options`: LLMEngine's (max_num_seqs, max_num_batched_tokens, num_blocks,
        gpu_memory_utilization, enable_prefix_caching, max_model_len)."""
        self.runner = runner
        self.engine = LLMEngine(runner, **engine_options)
        self._ids = itertools.count()

    @classmethod
    def load(cls, plan: str | Path, device: str = "cpu", *, verify_weights: bool = True, interpret: bool = False,
             enforce_eager: bool = False, launch_pdl: bool = True, **engine_options) -> LLM:
        """A plan compiled with --tp N starts its N ranks (`runtime/distributed.py`); this process is rank 0."""
        from rdnac.plans import read_plan

        num_ranks = read_plan(plan, header_only=True).num_ranks
        if num_ranks > 1:
            from rdnac.runtime.distributed import start

            return cls(start(plan, num_ranks, device=device, verify_weights=verify_weights, interpret=interpret,
                             enforce_eager=enforce_eager, launch_pdl=launch_pdl), **engine_options)
        runner = ModelRunner.load(plan, device=device, verify_weights=verify_weights, interpret=interpret,
                                  enforce_eager=enforce_eager, launch_pdl=launch_pdl)
        return cls(runner, **engine_options)

    # the runner's and engine's facts, for callers that only hold the LLM
    plan = property(lambda self: self.runner.plan)
    graph = property(lambda self: self.runner.graph)
    weights = property(lambda self: self.runner.weights)
    device = property(lambda self: self.runner.device)
    load_timings = property(lambda self: self.runner.load_timings)
    tokenizer = property(lambda self: self.engine.tokenizer)
    max_model_len = property(lambda self: self.engine.max_model_len)
    max_num_seqs = property(lambda self: self.engine.max_num_seqs)

    def default_params(self, **overrides) -> SamplingParams:
        """SamplingParams from the plan's generation_config, with the given fields (None: unset) on top."""
        return SamplingParams.from_generation_config(self.engine.generation_config, **overrides)

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        return self.engine.encode_prompt(prompt, chat)

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Run prompts (text, token ids or chat messages) to completion as one batch; one final output per
        prompt, in order. `chat=True` renders text prompts as a user message with the chat template."""
        return self.engine.generate(prompts, params if params is not None else self.default_params(), chat=chat)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete one conversation (a list of messages) or several (a list of them)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate(conversations, params, chat=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False
               ) -> Iterator[RequestOutput]:
        """Yield one prompt's outputs as its tokens arrive (new_text: the text each adds); requires an idle LLM."""
        if self.engine.has_unfinished():
            raise RequestError("stream requires an idle LLM; got requests in flight")
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params if params is not None else self.default_params(),
                                chat=chat)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.error is not None:
                        raise out.error
                    yield out
        finally:
            self.engine.abort_request(request_id)  # a consumer that stops early frees the request
            while self.engine.has_unfinished():
                self.engine.step()

    def close(self) -> None:
        """Stop a sharded plan's other ranks (also done at exit); a no-op for a plan of one rank."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, V] (on the CPU) for every position of one token sequence."""
        return self.engine.logits(token_ids)
