"""LLMEngine: the one generation loop. Requests in, streamed outputs out, over one `ModelRunner`.

Each `step()` asks the `Scheduler` for one batch of token ranges (decodes
plus prefill chunks), runs it with `ModelRunner.execute`, which samples the
next token of every sequence whose prompt is complete (`sampling.py`, on the
device), then detokenizes incrementally and checks the stop conditions.
`rdnac run`, `rdnac serve`, `rdnac bench` and the Python API (`llm.py`) all
submit their requests here, so a seed gives the same tokens everywhere.

The LLMEngine owns the runner's state: one LLMEngine per runner at a time
(a new one reallocates it). Methods are serialized by a lock, so one thread
may run `step()` while others add or abort requests.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import replace

import torch

from rdnac.errors import EngineError, RequestError
from rdnac.runtime.block_manager import BlockManager, blocks_for
from rdnac.runtime.detokenizer import Detokenizer, release_text
from rdnac.runtime.model_runner import ModelRunner, StepEntry
from rdnac.runtime.engine_probe import first_line, probe_model
from rdnac.runtime.requests import Prompt, Request, RequestOutput, final_output, sampling_batch
from rdnac.runtime.sampling import top_logprobs
from rdnac.runtime.sampling_params import SamplingParams, is_int, is_number
from rdnac.runtime.scheduler import Scheduler
from rdnac.runtime.sequence import Sequence
from rdnac.runtime.state_cache import default_num_blocks
from rdnac.runtime.token_bitmask import TokenBitmasks
from rdnac.runtime.tokenizer import Tokenizer

log = logging.getLogger("rdnac.engine")

_UNLIMITED = 1 << 30  # ModelRunner's value for a plan that sets no limit
_DEFAULT_MAX_NUM_SEQS = 256


class LLMEngine:
    def __init__(self, runner: ModelRunner, *, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = False,
                 max_model_len: int | None = None):
        self.runner = runner
        self._bitmasks = TokenBitmasks(runner.vocab_size, runner.device)  # grammars' masks, per batch bucket
        body = runner.plan.body
        tok = body["tokenizer"]
        self.generation_config = body.get("generation_config") or {}
        self.tokenizer = Tokenizer(tok["json"], tok["config"], body.get("chat_template"), self.generation_config)
        self.block_size = runner.block_size
        # a serve-time limit may lower the plan's (fewer KV blocks per sequence), never raise it
        self.max_model_len = _limit("max_model_len", max_model_len, runner.max_model_len)
        plan_seqs = runner.max_num_seqs if runner.max_num_seqs < _UNLIMITED else _DEFAULT_MAX_NUM_SEQS
        plan_tokens = (runner.max_num_batched_tokens if runner.max_num_batched_tokens < _UNLIMITED
                       else max(self.max_model_len, 2048))
        self.max_num_seqs = _limit("max_num_seqs", max_num_seqs, plan_seqs)
        self.max_num_batched_tokens = _limit("max_num_batched_tokens", max_num_batched_tokens, plan_tokens)
        # per-sequence state (linear attention): one slot per sequence that may run at once
        num_slots = self.max_num_seqs if runner.bytes_per_sequence else 0
        if num_slots and enable_prefix_caching:
            raise RequestError("enable_prefix_caching requires a plan whose state is all paged; this plan keeps "
                               "per-sequence state, which a cached prefix cannot restore; turn prefix caching off")
        if not is_number(gpu_memory_utilization) or not 0 < gpu_memory_utilization <= 1:
            raise RequestError(f"gpu_memory_utilization requires a number in (0, 1]; got {gpu_memory_utilization!r}")
        if num_blocks is None:  # what the memory budget holds, up to every sequence at full length
            step_bytes = 0
            if runner.device == "cuda":  # the largest step's activations come out of the budget first
                step_bytes = runner.profile_step_bytes(self.max_num_batched_tokens)
            num_blocks = default_num_blocks(runner.graph.state, self.block_size, num_slots,
                                            blocks_for(self.max_model_len, self.block_size), self.max_num_seqs,
                                            runner.device, gpu_memory_utilization, step_bytes)
        if not is_int(num_blocks) or num_blocks < 1:
            raise RequestError(f"num_blocks requires a positive integer; got {num_blocks!r}")
        runner.allocate_state(num_blocks, num_slots, self.max_num_seqs)
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching, num_slots)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # abort outputs, returned by the next step()
        self._deferred: dict[str, str] = {}  # request id -> the request whose prefill it waits for (shares)
        self._lock = threading.RLock()
        self._num_generated_tokens = 0
        self._num_prompt_tokens = 0
        self._num_steps = 0
        self._num_generate_calls = 0
        # why the engine can no longer run the model (a failed step whose probe failed too), or None
        self.failure: str | None = None

    # ------------------------------------------------------------ prompts

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(is_int(t) for t in prompt):
            vocab = self.runner.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token ids require 0 <= id < {vocab}; got {bad[:5]}")
            return list(prompt)
        raise RequestError(f"a prompt requires a string, a list of token ids or a list of chat messages; "
                           f"got {type(prompt).__name__}")

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, chat: bool = False,
                    prefill_after: str | None = None) -> int:
        """Queue a request; returns its number of prompt tokens. `prefill_after`: a request in flight with the
        same prompt (another of `n` choices); with prefix caching on, this one is scheduled once that one's
        prompt is in the cache, so the prompt's full blocks are computed once and shared."""
        if self.failure is not None:
            raise EngineError(self.failure)
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params requires a SamplingParams; got {type(params).__name__}")
        params = replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))  # own copy
        ids = self.encode_prompt(prompt, chat)
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
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request id requires a value not already in flight; got {request_id!r} twice")
            seq = Sequence(request_id, list(ids))
            matcher = params.guide.matcher() if params.guide is not None else None
            self._requests[request_id] = Request(seq, params, max_tokens, seed, Detokenizer(self.tokenizer, ids),
                                                  matcher)
            parent = self._requests.get(prefill_after) if prefill_after is not None else None
            if parent is not None and self.block_manager.enable_prefix_caching and not parent.is_finished \
                    and parent.seq.token_ids[:parent.seq.num_prompt_tokens] == ids:
                self._deferred[request_id] = prefill_after
            else:
                self.scheduler.add(seq)
            self._num_prompt_tokens += len(ids)
        return len(ids)

    def _release_deferred(self) -> None:
        """Schedule the requests whose prefill-sharing parent has its prompt computed (or has gone)."""
        for request_id, parent_id in list(self._deferred.items()):
            parent = self._requests.get(parent_id)
            if parent is None or parent.is_finished or parent.seq.num_computed_tokens >= parent.seq.num_prompt_tokens:
                del self._deferred[request_id]
                self.scheduler.add(self._requests[request_id].seq)

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; its final output (finish_reason "abort") comes from the next step()."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.is_finished:
                return
            if self._deferred.pop(request_id, None) is None:  # a deferred request holds nothing yet
                self.scheduler.finish(req.seq)
            req.is_finished = True
            self._pending.append(final_output(req, "abort"))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._pending) or bool(self._deferred) or self.scheduler.has_unfinished()

    # ------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that got a token or finished.

        An exception while running a request fails that request only (finish_reason "error", the exception
        in `error`, its blocks freed); the engine keeps serving the others. When nothing in a failed step ran,
        even alone, a one-token probe tells a request's fault from the engine's (`probe_model`); if the probe fails
        too, every request fails with an EngineError, `failure` says why, and no request is taken again."""
        with self._lock:
            outputs, self._pending = self._pending, []
            for out in outputs:
                del self._requests[out.request_id]
            if self.failure is not None:
                return outputs + self._fail_all()
            self._release_deferred()
            chunks = self.scheduler.schedule()
            if not chunks:
                return outputs
            self._num_steps += 1
            try:
                return outputs + self._run(chunks)
            except EngineError as e:  # the engine itself is gone (a tensor-parallel rank died): no rerun, no probe
                self.failure = str(e)
                log.error("rdnac: engine unhealthy: %s", self.failure)
                return outputs + self._fail_all()
            except Exception as e:  # noqa: BLE001 -- the model step failed before any request took its token
                log.exception("rdnac: a step of %d sequences failed", len(chunks))
                failed, num_ran = self._isolate(chunks, e)
                if num_ran == 0 and not probe_model(self.runner, self.block_manager):
                    self.failure = (f"the engine can no longer run the model: a step failed ({type(e).__name__}: "
                                    f"{first_line(e)}) and a one-token probe run alone failed too; do restart "
                                    f"the server (reload the plan)")
                    log.error("rdnac: engine unhealthy: %s", self.failure)
                    failed = [replace(out, error=EngineError(self.failure)) for out in failed]
                    return outputs + failed + self._fail_all()
                return outputs + failed

    def _run(self, chunks: list) -> list[RequestOutput]:
        entries = [StepEntry(c.seq.token_ids, c.seq.block_table, c.start, c.end, c.seq.state_slot) for c in chunks]
        reqs = [self._requests[c.seq.seq_id] if c.is_last else None for c in chunks]  # None: gives no token
        batch = sampling_batch(reqs, self.tokenizer.eos_token_ids, self._bitmasks)
        result = self.runner.execute(entries, batch)
        is_sampled = any(r is not None for r in reqs)
        tokens = result.tokens.tolist() if is_sampled else []  # one device->host copy per step
        logprobs = result.logprobs.tolist() if result.logprobs is not None else [None] * len(reqs)
        num_top = max((r.params.top_logprobs for r in reqs if r is not None), default=0)
        tops = [None] * len(reqs)
        if num_top:
            values, ids = top_logprobs(result.logits, batch, num_top)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        self.scheduler.update(chunks)  # nothing above changed the engine's state: a failed step can be rerun
        outputs = []
        for r, t, lp, top in zip(reqs, tokens, logprobs, tops):
            if r is None:
                continue
            try:
                outputs.append(self._append_token(r, t, lp, top))
            except Exception as e:  # noqa: BLE001 -- e.g. detokenizing: this request's alone
                log.exception("rdnac: request %r failed", r.seq.seq_id)
                outputs.append(self._fail(r, e))
        return outputs

    def _isolate(self, chunks: list, error: Exception) -> tuple[list[RequestOutput], int]:
        """After a failed step: rerun its chunks one at a time, failing only those that fail alone; returns the
        outputs and how many chunks ran. A rerun rewrites the same KV slots with the same values; per-sequence
        (recurrent) state may have been advanced by the failed step, so such a plan fails the whole step
        instead."""
        if len(chunks) == 1 or self.runner.bytes_per_sequence:
            return [self._fail(self._requests[c.seq.seq_id], error) for c in chunks], 0
        outputs, num_ran = [], 0
        for c in chunks:
            try:
                outputs += self._run([c])
                num_ran += 1
            except Exception as e:  # noqa: BLE001
                log.exception("rdnac: request %r failed", c.seq.seq_id)
                outputs.append(self._fail(self._requests[c.seq.seq_id], e))
        return outputs, num_ran

    def _fail_all(self) -> list[RequestOutput]:
        """Fail every request in flight with the engine's failure (their blocks freed)."""
        error = EngineError(self.failure)
        outputs = []
        for request_id in list(self._requests):
            req = self._requests[request_id]
            if self._deferred.pop(request_id, None) is not None:
                req.is_finished = True  # a deferred request holds nothing: nothing to give back
            outputs.append(self._fail(req, error))
        return outputs

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        seq = req.seq
        self._requests.pop(seq.seq_id, None)
        if not req.is_finished:
            self.scheduler.finish(seq)
            req.is_finished = True
        return final_output(req, "error", error)

    def _append_token(self, req: Request, token: int, logprob: float | None,
                      top: list[tuple[int, float]] | None) -> RequestOutput:
        seq, params = req.seq, req.params
        seq.token_ids.append(token)
        self._num_generated_tokens += 1
        if req.matcher is not None:
            req.matcher.accept(token)
        finish_reason = None
        may_stop = seq.num_output_tokens >= params.min_tokens
        is_stop_token = (token in self.tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        if is_stop_token and may_stop:
            finish_reason = "stop"  # the stop token is kept in token_ids, not in the text
            delta = req.detokenizer.flush()
        else:
            delta = req.detokenizer.push(token)
            if seq.num_tokens - seq.num_prompt_tokens >= req.max_tokens:
                finish_reason = "length"
                delta += req.detokenizer.flush()
        num_released = req.num_released
        req.text, req.num_released, is_stopped = release_text(req.text, req.num_released, delta,
                                                              params.stop if may_stop else [],
                                                              is_final=finish_reason is not None)
        if is_stopped:
            finish_reason = "stop"
        if finish_reason is not None:
            self.scheduler.finish(seq)
            req.is_finished = True
            del self._requests[seq.seq_id]
        return RequestOutput(seq.seq_id, [token], req.text[num_released:req.num_released], list(seq.output_ids),
                             req.released_text, [logprob] if params.logprobs else None, finish_reason is not None,
                             finish_reason, seq.num_prompt_tokens,
                             seq.token_ids[:seq.num_prompt_tokens] if finish_reason is not None else None,
                             top_logprobs=[top[:params.top_logprobs]] if params.top_logprobs else None)

    # ------------------------------------------------------------ state

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_total_blocks

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, V] (on the CPU) for every position of one token sequence, through the runner
        with blocks borrowed from the pool (the tests' and tools' reference helper, outside the loop)."""
        ids = self.encode_prompt(list(token_ids))
        if not ids or len(ids) > self.max_model_len:
            raise RequestError(f"logits requires 1..{self.max_model_len} token ids (the plan's max model length); "
                               f"got {len(ids)}")
        with self._lock:
            bm = self.block_manager
            if bm.num_slots and not bm.num_free_slots:
                raise RequestError(f"logits requires a free state slot (the plan keeps per-sequence state); got all "
                                   f"{bm.num_slots} in use; let running requests finish")
            table = bm.take_blocks(blocks_for(len(ids), self.block_size))
            slot = bm.take_slot()
            try:
                return self.runner.logits(ids, table, slot)
            finally:
                bm.free(table)
                bm.free_slot(slot)

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + len(self._deferred),
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
        tops: dict[str, list] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                logprobs[out.request_id] += out.logprobs or []
                tops[out.request_id] += out.top_logprobs or []
                if out.finished:
                    final[out.request_id] = out
        failed = [o.error for o in final.values() if o.error is not None]
        if failed:
            raise failed[0]
        return [RequestOutput(o.request_id, list(o.token_ids), o.text, o.token_ids, o.text,
                              logprobs[o.request_id] if o.logprobs is not None else None, True, o.finish_reason,
                              o.num_prompt_tokens, o.prompt_token_ids,
                              top_logprobs=tops[o.request_id] if o.top_logprobs is not None else None)
                for o in (final[i] for i in ids)]


def _limit(name: str, value: int | None, plan_limit: int) -> int:
    if value is None:
        return plan_limit
    if not is_int(value) or not 1 <= value <= plan_limit:
        raise RequestError(f"{name} requires an integer in 1..{plan_limit} (the plan's limit); got {value!r}; "
                           f"recompile with a larger --{name.replace('_', '-')} to go higher")
    return value
