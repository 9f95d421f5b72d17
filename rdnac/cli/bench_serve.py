"""`rdnac bench serve`: the HTTP load generator's options (`rdnac.bench.serve_client` measures).

    rdnac bench serve --base-url http://127.0.0.1:8000 --model M --num-prompts 200 --request-rate 8 \\
        --max-concurrency 32 --random-input-len 512 --random-output-len 128 --save-result

Options are named as vLLM's `bench serve` names them, so a command line
moves between the two; the result JSON has vLLM's keys.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime
from pathlib import Path

import click

from rdnac.errors import RdnacError


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"requires a number or inf; got {value!r}", param_hint="--request-rate") from None
    if not rate > 0:
        raise click.BadParameter(f"requires a positive number or inf; got {value!r}", param_hint="--request-rate")
    return rate


@click.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True, help="The server's URL.")
@click.option("--endpoint", default="/v1/completions", show_default=True,
              help="/v1/completions or /v1/chat/completions.")
@click.option("--model", help="Model id to send (default: the first of the server's /v1/models).")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key (default: $OPENAI_API_KEY).")
@click.option("--dataset-name", type=click.Choice(["random", "jsonl", "sharegpt"]), default="random",
              show_default=True)
@click.option("--dataset-path", type=click.Path(dir_okay=False, exists=True), help="For jsonl and sharegpt.")
@click.option("--num-prompts", default=100, show_default=True, type=click.IntRange(1))
@click.option("--random-input-len", default=128, show_default=True, type=click.IntRange(1),
              help="Random dataset: words per prompt (about one token each).")
@click.option("--random-output-len", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens asked per request (file datasets too, unless a line says its own).")
@click.option("--random-range-ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Random lengths within +-ratio of the asked ones.")
@click.option("--request-rate", default="inf", show_default=True,
              help="Requests per second (Poisson arrivals); inf sends all at once.")
@click.option("--burstiness", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Gamma shape of the arrival gaps (1: Poisson; lower: burstier).")
@click.option("--max-concurrency", type=click.IntRange(1), help="Most requests in flight at once.")
@click.option("--ignore-eos", is_flag=True, help="Send ignore_eos (fixed output lengths, where the server has it).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--percentile-metrics", "metric_percentiles", default="99", show_default=True,
              help="Comma-separated percentiles reported for ttft, tpot, itl and e2el (e.g. 50,90,99).")
@click.option("--save-result", is_flag=True, help="Write the result JSON.")
@click.option("--result-dir", type=click.Path(file_okay=False), default=".", show_default=True)
@click.option("--result-filename", help="Default: rdnac-bench-serve-MODEL-DATE.json.")
def bench_serve_cmd(base_url, endpoint, model, api_key, dataset_name, dataset_path, num_prompts, random_input_len,
                    random_output_len, random_range_ratio, request_rate, burstiness, max_concurrency, ignore_eos,
                    seed, metric_percentiles, save_result, result_dir, result_filename):
    """Load any OpenAI-compatible server over HTTP; vLLM's result keys and percentiles."""
    from rdnac.bench import serve_client

    rate = _rate(request_rate)
    try:
        percentiles = tuple(float(p) for p in metric_percentiles.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"requires comma-separated numbers; got {metric_percentiles!r}",
                                 param_hint="--percentile-metrics") from None
    if not percentiles or not all(0 < p <= 100 for p in percentiles):
        raise click.BadParameter(f"requires percentiles in (0, 100]; got {metric_percentiles!r}",
                                 param_hint="--percentile-metrics")
    if dataset_name == "random":
        requests = serve_client.random_requests(num_prompts, random_input_len, random_output_len, seed,
                                                random_range_ratio)
    elif dataset_path is None:
        raise click.UsageError(f"--dataset-name {dataset_name} requires --dataset-path")
    else:
        requests = serve_client.file_requests(dataset_path, dataset_name, num_prompts, random_output_len, seed)
    model = model or _served_model(base_url, api_key)
    click.echo(f"rdnac bench serve: {num_prompts} requests to {base_url}{endpoint} ({model}), request rate "
               f"{rate}, burstiness {burstiness}, max concurrency {max_concurrency or 'none'}", err=True)
    records, duration = asyncio.run(serve_client.run(
        base_url, endpoint, model, requests, request_rate=rate, burstiness=burstiness,
        max_concurrency=max_concurrency, seed=seed, api_key=api_key, ignore_eos=ignore_eos))
    settings = {"backend": "openai-chat" if endpoint.rstrip("/").endswith("chat/completions") else "openai",
                "base_url": base_url, "endpoint": endpoint, "model_id": model, "tokenizer_id": None,
                "dataset_name": dataset_name, "num_prompts": num_prompts,
                "request_rate": "inf" if math.isinf(rate) else rate, "burstiness": burstiness,
                "max_concurrency": max_concurrency}
    result = serve_client.summarize(records, duration, percentiles=percentiles, settings=settings)
    click.echo(serve_client.render(result, percentiles))
    failures = [e for e in result["errors"] if e]
    if failures:
        click.echo(f"rdnac bench serve: {len(failures)} requests failed; the first: {failures[0]}", err=True)
    if save_result:
        name = result_filename or f"rdnac-bench-serve-{model.replace('/', '-')}-{datetime.now():%Y%m%d-%H%M%S}.json"
        path = Path(result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {path}", err=True)


def _served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=30)
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise RdnacError(f"rdnac bench serve requires --model or a server answering GET {url} with a model; "
                         f"got {type(e).__name__}: {e}; pass --model") from None
