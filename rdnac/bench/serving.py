"""`rdnac bench PLAN`: serving latency and throughput over concurrency levels.

For each concurrency level C, keeps C requests in flight (closed loop) over
the LLMEngine until `num_prompts` have finished, with random token prompts
of `input_len` tokens and exactly `output_len` generated tokens each
(ignore_eos). Reports TTFT, TPOT (time per output token after the first),
end-to-end latency percentiles, output and total tokens/s.
"""

from __future__ import annotations

import random
import statistics
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def run_level(engine, concurrency: int, num_prompts: int, input_len: int, output_len: int, vocab: int,
              seed: int, progress=None, task=None) -> dict:
    from rdnac import SamplingParams

    rng = random.Random(seed + concurrency)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    next_id = 0
    started = time.perf_counter()
    while len(done) < num_prompts:
        while next_id < num_prompts and len(submitted) - len(done) < concurrency:
            rid = f"b{concurrency}-{next_id}"
            prompt = [rng.randrange(10, vocab) for _ in range(input_len)]
            engine.add_request(rid, prompt, params)
            submitted[rid] = time.perf_counter()
            next_id += 1
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, len(out.token_ids))
                if progress is not None:
                    progress.advance(task)
    wall = time.perf_counter() - started
    ttft = [first[r] - submitted[r] for r in done]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in done if done[r][1] > 1]
    latency = [done[r][0] - submitted[r] for r in done]
    out_tokens = sum(n for _, n in done.values())
    return {"concurrency": concurrency, "num_prompts": num_prompts, "input_len": input_len,
            "output_len": output_len, "wall_s": wall, "output_tokens_per_s": out_tokens / wall,
            "total_tokens_per_s": (out_tokens + input_len * len(done)) / wall,
            "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot), "latency_s": _percentiles(latency)}


def bench(plan: str, *, device: str, concurrency: list[int], input_len: int, output_len: int,
          num_prompts: int | None, seed: int, enforce_eager: bool, quiet: bool) -> list[dict]:
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner

    runner = ModelRunner.load(plan, device=device, enforce_eager=enforce_eager)
    llm = LLM(runner, max_num_seqs=min(max(concurrency), runner.max_num_seqs))
    vocab = llm.graph.attrs["vocab_size"]
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=quiet) as progress:
        for c in concurrency:
            n = num_prompts or max(2 * c, 8)
            task = progress.add_task(f"concurrency {c}", total=n)
            results.append(run_level(llm.engine, c, n, input_len, output_len, vocab, seed, progress, task))
    for r in results:
        r.update(device=device, graphs=llm.runner.use_graphs, plan=str(plan), target=llm.plan.header["target"])
    return results


def render(results: list[dict]) -> None:
    table = Table(title="rdnac bench")
    for col in ("conc.", "prompts", "in/out", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                "out tok/s", "total tok/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["concurrency"]), str(r["num_prompts"]), f"{r['input_len']}/{r['output_len']}",
                      f"{r['ttft_s']['p50'] * 1e3:.1f}", f"{r['ttft_s']['p99'] * 1e3:.1f}",
                      f"{r['tpot_s']['p50'] * 1e3:.2f}", f"{r['tpot_s']['p99'] * 1e3:.2f}",
                      f"{r['output_tokens_per_s']:.1f}", f"{r['total_tokens_per_s']:.1f}")
    Console().print(table)
