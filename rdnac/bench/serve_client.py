"""`rdnac bench serve`: a load generator over HTTP against any OpenAI-compatible server.

The same client measures rdnac and another engine: prompts from a dataset
(random words, a JSONL file of prompts, or ShareGPT conversations) are sent
to /v1/completions or /v1/chat/completions at a request rate (Poisson
arrivals, or gamma with --burstiness, as vLLM's `bench serve` draws them)
under a concurrency cap, streamed, and timed per request:

    ttft   send to the first chunk carrying text (the role-only chunk of chat does not count)
    itl    gaps between later chunks carrying text
    e2el   send to the end of the stream
    tpot   (e2el - ttft) / (output tokens - 1), for requests of more than one token

Token counts are the server's own (`usage`, asked for with stream_options),
so no tokenizer of the served model is needed. `summarize` turns the
per-request records into vLLM's result JSON (keys `mean_ttft_ms`,
`median_tpot_ms`, `p99_itl_ms`, `request_throughput`, ..., and the records
themselves as `ttfts`, `itls`, `input_lens`, `output_lens`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rdnac.errors import RdnacError

# words of the random dataset: common, single-token in most vocabularies, so input length ~ tokens
_WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be has had one "
          "their first after new two who they its also time into year more other over city river small world "
          "state part under water house light early north south east west great long music story people").split()


@dataclass
class Request:
    prompt: str
    output_len: int


@dataclass
class Record:
    """One request as the client saw it; times in seconds from its send."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0  # seconds since the benchmark started
    generated_text: str = ""
    error: str = ""


# ---------------------------------------------------------------- datasets


def random_requests(num_prompts: int, input_len: int, output_len: int, seed: int, range_ratio: float = 0.0) -> list[Request]:
    """`num_prompts` prompts of about `input_len` random words (lengths within +-range_ratio, as vLLM's)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        n_in = max(1, round(input_len * rng.uniform(1 - range_ratio, 1 + range_ratio)))
        n_out = max(1, round(output_len * rng.uniform(1 - range_ratio, 1 + range_ratio)))
        out.append(Request(" ".join(rng.choice(_WORDS) for _ in range(n_in)), n_out))
    return out


def file_requests(path: str | Path, fmt: str, num_prompts: int, output_len: int, seed: int) -> list[Request]:
    """Prompts from a JSONL file (a string, or {"prompt", optional "output_len"/"max_tokens"} per line) or a
    ShareGPT JSON (the first human turn of each conversation); shuffled by `seed`, `num_prompts` of them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RdnacError(f"--dataset-path requires a readable UTF-8 file; got {path}: {e}") from None
    requests = []
    if fmt == "sharegpt":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise RdnacError(f"{path}: a ShareGPT dataset requires a JSON list; got {e}") from None
        for item in items if isinstance(items, list) else []:
            turns = item.get("conversations") or item.get("conversation") or [] if isinstance(item, dict) else []
            human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
            if isinstance(human, str) and human.strip():
                requests.append(Request(human, output_len))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise RdnacError(f"{path}:{number}: requires one JSON value per line; got {e}") from None
            if isinstance(item, str):
                requests.append(Request(item, output_len))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                requests.append(Request(item["prompt"], int(item.get("output_len") or item.get("max_tokens") or output_len)))
            else:
                raise RdnacError(f"{path}:{number}: requires a string or an object with a string \"prompt\"; "
                                 f"got {line[:60]!r}")
    if not requests:
        raise RdnacError(f"{path}: requires at least one prompt; got none ({fmt} format)")
    random.Random(seed).shuffle(requests)
    return [requests[i % len(requests)] for i in range(num_prompts)]


# ---------------------------------------------------------------- the run


def arrival_gaps(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: none at an infinite rate, else gamma(burstiness) gaps of mean
    1/request_rate (burstiness 1 is a Poisson process)."""
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]


async def _send(client, url: str, body: dict, chat: bool, headers: dict, started: float) -> Record:
    record = Record(start=time.perf_counter() - started)
    send = time.perf_counter()
    last = send
    usage = None
    parts = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"])[:200]
                    return record
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                delta = choices[0].get("delta") or {} if chat else choices[0]
                text = (delta.get("content") or delta.get("reasoning_content") or "") if chat else (delta.get("text") or "")
                if not text:
                    continue  # the role chunk, a finish chunk: no token arrived
                now = time.perf_counter()
                if not parts:
                    record.ttft = now - send
                else:
                    record.itl.append(now - last)
                last = now
                parts.append(text)
        record.latency = time.perf_counter() - send
    except Exception as e:  # noqa: BLE001 -- a failed request is a record with its error, the run goes on
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.generated_text = "".join(parts)
    if usage is None:
        record.error = "the server sent no usage (stream_options.include_usage); token counts unknown"
        return record
    record.prompt_len, record.output_len = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    record.success = bool(parts)
    if not parts:
        record.error = "the stream carried no text"
    return record


async def run(base_url: str, endpoint: str, model: str, requests: list[Request], *, request_rate: float = math.inf,
              burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0, api_key: str | None = None,
              ignore_eos: bool = False, temperature: float = 0.0, timeout: float = 600.0) -> tuple[list[Record], float]:
    """Send every request (at the rate, under the cap); returns the records (in request order) and the
    benchmark's duration in seconds."""
    import httpx

    chat = endpoint.rstrip("/").endswith("chat/completions")
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gaps = arrival_gaps(len(requests), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(request: Request) -> Record:
            body = {"model": model, "max_tokens": request.output_len, "temperature": temperature, "stream": True,
                    "stream_options": {"include_usage": True}}
            if chat:
                body["messages"] = [{"role": "user", "content": request.prompt}]
            else:
                body["prompt"] = request.prompt
            if ignore_eos:
                body["ignore_eos"] = True
            if limit is None:
                return await _send(client, url, body, chat, headers, started)
            async with limit:
                return await _send(client, url, body, chat, headers, started)

        started = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return list(records), duration


# ---------------------------------------------------------------- results


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between ranks (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _p_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def summarize(records: list[Record], duration: float, *, percentiles: tuple[float, ...] = (99,),
              settings: dict | None = None) -> dict:
    """vLLM's result JSON of a run: totals, throughputs, mean/median/std/pN of ttft, tpot, itl and e2el in
    ms, and the per-request records (seconds) they were computed from."""
    done = [r for r in records if r.success]
    ttfts = [r.ttft for r in done]
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    itls = [gap for r in done for gap in r.itl]
    e2els = [r.latency for r in done]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    result = dict(settings or {})
    result.update({
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration if duration else 0.0,
        "request_goodput": None,
        "output_throughput": total_output / duration if duration else 0.0,
        "total_token_throughput": (total_input + total_output) / duration if duration else 0.0,
        "max_output_tokens_per_s": _peak_output_per_s(done),
        "max_concurrent_requests": _peak_concurrency(done),
    })
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = [v * 1000 for v in values]
        result[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        result[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        result[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0  # numpy's std: the population's
        for p in percentiles:
            result[f"p{_p_name(p)}_{name}_ms"] = percentile(ms, p)
    result.update({
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "e2els": [r.latency for r in records],
        "generated_texts": [r.generated_text for r in records],
        "errors": [r.error for r in records],
    })
    return result


def _peak_output_per_s(done: list[Record]) -> float:
    """Most tokens that arrived within one whole second of the run (chunks as tokens, as vLLM counts)."""
    seconds: dict[int, int] = {}
    for r in done:
        t = r.start + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            seconds[int(t)] = seconds.get(int(t), 0) + 1
    return float(max(seconds.values(), default=0))


def _peak_concurrency(done: list[Record]) -> int:
    events = sorted([(r.start, 1) for r in done] + [(r.start + r.latency, -1) for r in done])
    peak = live = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def render(result: dict, percentiles: tuple[float, ...] = (99,)) -> str:
    """The summary table, in vLLM's layout."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             f"{'Successful requests:':<40}{result['completed']:<10}",
             f"{'Failed requests:':<40}{result['failed']:<10}",
             f"{'Benchmark duration (s):':<40}{result['duration']:<10.2f}",
             f"{'Total input tokens:':<40}{result['total_input_tokens']:<10}",
             f"{'Total generated tokens:':<40}{result['total_output_tokens']:<10}",
             f"{'Request throughput (req/s):':<40}{result['request_throughput']:<10.2f}",
             f"{'Output token throughput (tok/s):':<40}{result['output_throughput']:<10.2f}",
             f"{'Total Token throughput (tok/s):':<40}{result['total_token_throughput']:<10.2f}"]
    for name, title, long in (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT",
                              "Time per Output Token (excl. 1st token)"), ("itl", "ITL", "Inter-token Latency"),
                              ("e2el", "E2EL", "End-to-end Latency")):
        lines.append("{s:{c}^50}".format(s=long, c="-"))
        lines.append(f"{f'Mean {title} (ms):':<40}{result[f'mean_{name}_ms']:<10.2f}")
        lines.append(f"{f'Median {title} (ms):':<40}{result[f'median_{name}_ms']:<10.2f}")
        for p in percentiles:
            lines.append(f"{f'P{_p_name(p)} {title} (ms):':<40}{result[f'p{_p_name(p)}_{name}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
