"""A request's life inside `LLMEngine` (llm_engine.py): what the engine keeps of one in flight, the outputs
it streams back, and the sampling rows a step's requests hand to the model runner.

The engine owns the loop (scheduling, failures, stop conditions); this module holds its data: `Request`
(a sequence with its params, seed, detokenizer and grammar matcher), `RequestOutput` (one per request per
step, and the final one), `final_output` (a request ended without a new token: aborted or failed) and
`sampling_batch` (the step's `SamplingBatch`, one row per step entry).
"""

from __future__ import annotations

from dataclasses import dataclass

from rdnac.runtime.detokenizer import Detokenizer
from rdnac.runtime.sampling import SamplingBatch
from rdnac.runtime.sampling_params import SamplingParams
from rdnac.runtime.sequence import Sequence
from rdnac.runtime.token_bitmask import TokenBitmasks

Prompt = str | list[int] | list[dict]

_NO_TOKEN = SamplingParams()  # the sampling row of a prompt chunk before the last: greedy, its token unused


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # text since the last output; a possible stop string or incomplete UTF-8 is held back
    token_ids: list[int]  # all generated tokens
    text: str  # all text released so far
    logprobs: list[float] | None  # of new_token_ids, if asked for
    finished: bool
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort" or "error"
    num_prompt_tokens: int
    prompt_token_ids: list[int] | None = None  # on the final output only
    error: Exception | None = None  # what failed the request (finish_reason "error")
    # per new token, its params.top_logprobs most likely (token id, logprob), if asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(eq=False)
class Request:
    """A request in flight: its sequence and what decides and decodes its tokens."""

    seq: Sequence
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the plan's max model length
    seed: int  # the params' seed, or one drawn at random when the request was added
    detokenizer: Detokenizer
    matcher: object | None = None  # the params' guide's matcher: which tokens the grammar allows next
    text: str = ""  # decoded text, held-back tail included
    num_released: int = 0  # characters of `text` already output
    is_finished: bool = False

    @property
    def released_text(self) -> str:
        return self.text[:self.num_released]


def final_output(req: Request, finish_reason: str, error: Exception | None = None) -> RequestOutput:
    """The last output of a request that ends without a new token: "abort" or "error" (with `error`)."""
    seq = req.seq
    return RequestOutput(seq.seq_id, [], "", list(seq.output_ids), req.released_text,
                         [] if req.params.logprobs else None, True, finish_reason, seq.num_prompt_tokens,
                         seq.token_ids[:seq.num_prompt_tokens], error=error,
                         top_logprobs=[] if req.params.top_logprobs else None)


def sampling_batch(reqs: list[Request | None], eos_token_ids: set[int], bitmasks: TokenBitmasks) -> SamplingBatch:
    """One sampling row per step entry, in order (None: an entry that gives no token)."""
    params = [r.params if r is not None else _NO_TOKEN for r in reqs]
    live = [r for r in reqs if r is not None]
    extras = {}
    if any(r.params.presence_penalty or r.params.frequency_penalty or r.params.logit_bias or r.params.min_tokens
           for r in live):
        def banned(r):  # before min_tokens, nothing that would end the request may be drawn
            if r is None or r.seq.num_output_tokens >= r.params.min_tokens:
                return []
            return sorted(({*eos_token_ids} if not r.params.ignore_eos else set()) | set(r.params.stop_token_ids))
        extras = dict(presence_penalties=[p.presence_penalty for p in params],
                      frequency_penalties=[p.frequency_penalty for p in params],
                      num_prompt_tokens=[r.seq.num_prompt_tokens if r is not None else 0 for r in reqs],
                      logit_biases=[p.logit_bias for p in params], banned=[banned(r) for r in reqs])
    if any(r.matcher is not None for r in live):  # grammars: one bitmask for the batch, applied on the device
        extras["token_bitmask"] = bitmasks.fill([r.matcher if r is not None else None for r in reqs])
    return SamplingBatch(
        temperatures=[p.temperature for p in params], top_ks=[p.top_k for p in params],
        top_ps=[p.top_p for p in params], min_ps=[p.min_p for p in params],
        repetition_penalties=[p.repetition_penalty for p in params],
        token_ids=[r.seq.token_ids if r is not None else [] for r in reqs],
        seeds=[r.seed if r is not None else 0 for r in reqs],
        steps=[r.seq.num_output_tokens if r is not None else 0 for r in reqs],
        needs_logprobs=any(p.logprobs for p in params), **extras)
