"""LLMEngine: requests in, streamed outputs out, over one `Engine`.

The serving loop: each `step()` asks the `Scheduler` for one batch of token
ranges (decodes plus prefill chunks), runs it with `Engine.execute`, samples
the next token of every sequence whose prompt is complete (`sampling.py`, on
the device), detokenizes incrementally and checks the stop conditions.

The LLMEngine owns the engine's KV cache: do not call `Engine.generate` or
`Engine.logits` on the same engine while it is in use. Methods are
serialized by a lock, so one thread may run `step()` while others add or
abort requests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import torch

from rdnac.errors import RequestError
from rdnac.runtime.block_manager import BlockManager, blocks_for
from rdnac.runtime.engine import Engine, Prompt, StepEntry
from rdnac.runtime.sampling import SamplingBatch, sample
from rdnac.runtime.scheduler import Scheduler, Sequence
from rdnac.runtime.tokenizer import Tokenizer

_UNLIMITED = 1 << 30  # Engine's value for a plan that sets no limit
_DEFAULT_MAX_NUM_SEQS = 256
_CPU_KV_LIMIT_BYTES = 1 << 30
_PROMPT_CONTEXT_TOKENS = 6  # prompt tail the detokenizer starts from, so the first word's spacing is right


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # x == x: not NaN


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1: off)"),
            ("seed", self.seed is None or _is_int(self.seed), "an integer or None"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list)
             and all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
            ("logprobs", isinstance(self.logprobs, bool), "a bool"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise RequestError(f"{name} requires {requirement}; got {getattr(self, name)!r}")


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # text since the last output; a possible stop string or incomplete UTF-8 is held back
    token_ids: list[int]  # all generated tokens
    text: str  # all text released so far
    logprobs: list[float] | None  # of new_token_ids, if asked for
    finished: bool
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length" or "abort"
    num_prompt_tokens: int


class _Detokenizer:
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


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the plan's max model length
    generator: torch.Generator | None
    detokenizer: _Detokenizer
    text: str = ""  # decoded text, held-back tail included
    num_released: int = 0  # characters of `text` already output
    is_finished: bool = False

    @property
    def released_text(self) -> str:
        return self.text[:self.num_released]


class LLMEngine:
    def __init__(self, engine: Engine, *, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = False):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.block_size = engine.block_size
        self.max_model_len = engine.max_model_len
        plan_seqs = engine.max_num_seqs if engine.max_num_seqs < _UNLIMITED else _DEFAULT_MAX_NUM_SEQS
        plan_tokens = (engine.max_num_batched_tokens if engine.max_num_batched_tokens < _UNLIMITED
                       else max(self.max_model_len, 2048))
        self.max_num_seqs = _limit("max_num_seqs", max_num_seqs, plan_seqs)
        self.max_num_batched_tokens = _limit("max_num_batched_tokens", max_num_batched_tokens, plan_tokens)
        if num_blocks is None:
            num_blocks = self._default_num_blocks(gpu_memory_utilization)
        if not _is_int(num_blocks) or num_blocks < 1:
            raise RequestError(f"num_blocks requires a positive integer; got {num_blocks!r}")
        cache = engine.init_kv_cache(num_blocks)
        # The block manager owns the pool now: Engine's own allocator is emptied so that mixing in
        # Engine.generate fails loudly instead of overwriting live KV blocks.
        cache.allocator.allocate(cache.allocator.num_free)
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []  # abort outputs, returned by the next step()
        self._lock = threading.RLock()
        self._num_generated_tokens = 0
        self._num_prompt_tokens = 0
        self._num_steps = 0
        self._num_generate_calls = 0

    def _default_num_blocks(self, gpu_memory_utilization: float) -> int:
        if not _is_number(gpu_memory_utilization) or not 0 < gpu_memory_utilization <= 1:
            raise RequestError(f"gpu_memory_utilization requires a number in (0, 1]; got {gpu_memory_utilization!r}")
        per_block = self.engine.kv_bytes_per_block()
        if self.engine.device == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info()
            num_blocks = int(free_bytes * gpu_memory_utilization) // per_block
        else:  # enough for max_num_seqs full-length sequences, within 1 GiB
            num_blocks = min(self.max_num_seqs * blocks_for(self.max_model_len, self.block_size),
                             _CPU_KV_LIMIT_BYTES // per_block)
        if num_blocks < 1:
            raise RequestError(f"the KV cache requires at least one block of {per_block} bytes; got room for none; "
                               f"free device memory or raise gpu_memory_utilization")
        return num_blocks

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, chat: bool = False) -> int:
        """Queue a request; returns its number of prompt tokens."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params requires a SamplingParams; got {type(params).__name__}")
        params = replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))  # own copy
        ids = self.engine.encode_prompt(prompt, chat)
        if not ids:
            raise RequestError("a prompt requires at least one token; got an empty prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens requires fewer than the plan's max model length "
                               f"{self.max_model_len}; shorten the prompt or recompile with a larger --max-model-len")
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        # The last token is sampled, never written to the cache: a request holds at most this many KV slots.
        need = blocks_for(len(ids) + max_tokens - 1, self.block_size)
        if need > self.block_manager.num_total_blocks:
            raise RequestError(f"request {request_id!r} requires {need} KV blocks ({len(ids)} prompt tokens + "
                               f"max_tokens {max_tokens}); got a pool of {self.block_manager.num_total_blocks} "
                               f"blocks of {self.block_size} tokens; lower max_tokens or raise num_blocks")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.engine.device).manual_seed(params.seed)
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request id requires a value not already in flight; got {request_id!r} twice")
            seq = Sequence(request_id, list(ids))
            self._requests[request_id] = _Request(seq, params, max_tokens, generator,
                                                  _Detokenizer(self.tokenizer, ids))
            self.scheduler.add(seq)
            self._num_prompt_tokens += len(ids)
        return len(ids)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; its final output (finish_reason "abort") comes from the next step()."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.is_finished:
                return
            self.scheduler.finish(req.seq)
            req.is_finished = True
            self._pending.append(RequestOutput(request_id, [], "", list(req.seq.output_ids), req.released_text,
                                               [] if req.params.logprobs else None, True, "abort",
                                               req.seq.num_prompt_tokens))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._pending) or self.scheduler.has_unfinished()

    # ------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that got a token or finished."""
        with self._lock:
            outputs, self._pending = self._pending, []
            for out in outputs:
                del self._requests[out.request_id]
            chunks = self.scheduler.schedule()
            if not chunks:
                return outputs
            self._num_steps += 1
            entries = [StepEntry(c.seq.token_ids, c.seq.block_table, c.start, c.end) for c in chunks]
            logits = self.engine.execute(entries)  # [len(chunks), V] float32
            self.scheduler.update(chunks)
            rows = [i for i, c in enumerate(chunks) if c.is_last]  # prompt chunks before the last give no token
            if not rows:
                return outputs
            reqs = [self._requests[chunks[i].seq.seq_id] for i in rows]
            if len(rows) < len(chunks):
                logits = logits[torch.tensor(rows, device=logits.device)]
            tokens, logprobs = sample(logits, SamplingBatch(
                temperatures=[r.params.temperature for r in reqs], top_ks=[r.params.top_k for r in reqs],
                top_ps=[r.params.top_p for r in reqs], min_ps=[r.params.min_p for r in reqs],
                repetition_penalties=[r.params.repetition_penalty for r in reqs],
                token_ids=[r.seq.token_ids for r in reqs], generators=[r.generator for r in reqs]))
            tokens = tokens.tolist()
            logprobs = logprobs.tolist() if any(r.params.logprobs for r in reqs) else [None] * len(reqs)
            outputs += [self._append_token(r, t, lp) for r, t, lp in zip(reqs, tokens, logprobs)]
            return outputs

    def _append_token(self, req: _Request, token: int, logprob: float | None) -> RequestOutput:
        seq, params = req.seq, req.params
        seq.token_ids.append(token)
        self._num_generated_tokens += 1
        finish_reason = None
        if (token in self.tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            finish_reason = "stop"  # the stop token is kept in token_ids, not in the text
            delta = req.detokenizer.flush()
        else:
            delta = req.detokenizer.push(token)
            if seq.num_tokens - seq.num_prompt_tokens >= req.max_tokens:
                finish_reason = "length"
                delta += req.detokenizer.flush()
        num_released = req.num_released
        if self._update_text(req, delta, is_final=finish_reason is not None):
            finish_reason = "stop"
        if finish_reason is not None:
            self.scheduler.finish(seq)
            req.is_finished = True
            del self._requests[seq.seq_id]
        return RequestOutput(seq.seq_id, [token], req.text[num_released:req.num_released], list(seq.output_ids),
                             req.released_text, [logprob] if params.logprobs else None, finish_reason is not None,
                             finish_reason, seq.num_prompt_tokens)

    def _update_text(self, req: _Request, delta: str, is_final: bool) -> bool:
        """Add decoded text, cut it at the first stop string, release what can no longer start one.
        Returns True if a stop string was found."""
        stops = req.params.stop
        longest = max((len(s) for s in stops), default=0)
        search_from = max(req.num_released, len(req.text) - longest + 1)
        req.text += delta
        hits = [i for i in (req.text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            req.text = req.text[:min(hits)]
            is_final = True
        held = 0
        if not is_final:  # hold back the longest tail that could still grow into a stop string
            held = next((k for k in range(min(longest - 1, len(req.text) - req.num_released), 0, -1)
                         if any(s.startswith(req.text[-k:]) for s in stops)), 0)
        req.num_released = len(req.text) - held
        return bool(hits)

    # ------------------------------------------------------------ state

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_total_blocks

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "preemptions": self.scheduler.num_preemptions, "generated_tokens": self._num_generated_tokens,
                    "prompt_tokens": self._num_prompt_tokens,
                    "prefix_cache_hit_tokens": self.block_manager.num_cache_hit_tokens,
                    "free_blocks": self.num_free_blocks, "total_blocks": self.num_total_blocks,
                    "steps": self._num_steps}

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; returns one final output per prompt, in order, whose new_* fields
        hold the whole generation. Requires an idle engine (its steps would swallow others' outputs)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts, list) and not isinstance(prompts[0], (str, list))):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError(f"generate requires one SamplingParams per prompt; got {len(params_list)} for "
                               f"{len(prompts)} prompts")
        if self.has_unfinished():
            raise RequestError("generate requires an idle LLMEngine; got requests in flight; drive them with step()")
        self._num_generate_calls += 1
        ids = [f"generate-{self._num_generate_calls}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list):
                self.add_request(request_id, prompt, p, chat=chat)
        except RequestError:
            for request_id in ids:
                self.abort_request(request_id)
            self.step()  # drains the abort outputs: nothing else is in flight
            raise
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list[float]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                logprobs[out.request_id] += out.logprobs or []
                if out.finished:
                    final[out.request_id] = out
        return [RequestOutput(o.request_id, list(o.token_ids), o.text, o.token_ids, o.text,
                              logprobs[o.request_id] if o.logprobs is not None else None, True, o.finish_reason,
                              o.num_prompt_tokens) for o in (final[i] for i in ids)]


def _limit(name: str, value: int | None, plan_limit: int) -> int:
    if value is None:
        return plan_limit
    if not _is_int(value) or not 1 <= value <= plan_limit:
        raise RequestError(f"{name} requires an integer in 1..{plan_limit} (the plan's limit); got {value!r}; "
                           f"recompile with a larger --{name.replace('_', '-')} to go higher")
    return value
