"""`rdnac bench`: serving over concurrency levels, GPU step timings of a plan, or the harness over a shape.

    rdnac bench PLAN [-c 1 -c 64]                       serving: TTFT, TPOT, throughput (any device)
    rdnac bench PLAN --decode --batch 1,64 --prefill 2048  decode TPOT + bandwidth, prefill TFLOP/s (GPU)
    rdnac bench --shape qwen3-8b --scheme fp8-block     harness: random checkpoint, compile, cold start,
                                                        decode + prefill, A/B variants, peers (GPU)
    rdnac bench serve --base-url URL [...]              HTTP load generator against any OpenAI-compatible
                                                        server, vLLM's result keys (cli/bench_serve.py)

The measuring code is `rdnac.bench`; this module maps options onto it and
refuses, in one line, what the machine cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from rdnac.errors import TargetError

SERVING_LEVELS = [1, 2, 4, 8, 16, 32, 64]


class _IntList(click.ParamType):
    """Comma-separated positive integers (`1,4,16`); with multiple=True the option may repeat too."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in str(value).replace(",", " ").split())
        except ValueError:
            self.fail(f"requires comma-separated integers; got {value!r}", param, ctx)
        if not numbers or min(numbers) < 1:
            self.fail(f"requires positive integers; got {value!r}", param, ctx)
        return numbers


class _ShapeName(click.ParamType):
    """A shape of `rdnac.testing.fp8.SHAPES` (dense) or `rdnac.bench.families.FAMILIES` (MoE, hybrid, MLA),
    looked up only when given (the CLI starts without torch)."""

    name = "SHAPE"

    def convert(self, value, param, ctx):
        from rdnac.bench.families import FAMILIES
        from rdnac.testing.fp8 import SHAPES

        if value not in SHAPES and value not in FAMILIES:
            self.fail(f"requires one of {', '.join(sorted(SHAPES) + list(FAMILIES))}; got {value!r}", param, ctx)
        return value


def _flat(groups) -> tuple[int, ...]:
    return tuple(n for group in groups for n in group)


def require_gpu(what: str) -> None:
    """Step timings synchronize a CUDA/HIP device; on a machine without one they refuse, in one line."""
    import torch

    if not torch.cuda.is_available():
        raise TargetError(f"rdnac bench {what} requires a CUDA/HIP GPU; got none visible to torch "
                          f"(torch.cuda.is_available() is False); run it on the GPU machine, or measure serving "
                          f"with `rdnac bench PLAN` alone")


class _BenchCommand(click.Command):
    """`rdnac bench`, whose first argument `serve` runs `rdnac bench serve` instead (a plan is never named
    `serve`: plans end in .msgpack)."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "serve":
            from rdnac.cli.bench_serve import bench_serve_cmd

            # a context for `bench` itself, so usage reads `rdnac bench serve` and the environment
            # prefix is RDNAC_BENCH_SERVE_
            # (a bare group: this command's [PLAN] is no part of that usage)
            bench_ctx = click.Context(click.Group(info_name), info_name=info_name, parent=parent)
            return bench_serve_cmd.make_context("serve", list(args[1:]), parent=bench_ctx, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("bench", cls=_BenchCommand)
@click.argument("plan", type=click.Path(dir_okay=False), required=False)
@click.option("--concurrency", "-c", multiple=True, type=int,
              help="Serving: levels (repeatable; default 1 2 4 8 16 32 64).")
@click.option("--input-len", default=128, show_default=True, help="Serving: prompt tokens per request.")
@click.option("--output-len", default=128, show_default=True, help="Serving: generated tokens per request.")
@click.option("--num-prompts", type=int, help="Serving: requests per level (default max(2 x concurrency, 8)).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Serving: default from the plan.")
@click.option("--seed", default=0, show_default=True, help="Serving: prompt seed.")
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs (serving and --decode/--prefill).")
@click.option("--json", "as_json", is_flag=True, help="Serving: print the results as JSON.")
@click.option("--decode", is_flag=True, help="Time PLAN's decode steps at each --batch (GPU).")
@click.option("--batch", multiple=True, type=_IntList(),
              help="Decode batch sizes, e.g. 1,4,16,64 (default; repeatable).")
@click.option("--context", type=click.IntRange(1),
              help="Cached tokens per sequence a decode step is timed at (default 256; a family shape's own "
                   "contexts, e.g. 256 and 8192 for deepseek-v2-lite).")
@click.option("--prefill", multiple=True, type=_IntList(),
              help="Prefill sizes in tokens, e.g. 512,2048 (with PLAN: time these; harness default 512,2048).")
@click.option("--profile", is_flag=True, help="Per-node kernel breakdown of a batch-1 decode and the largest prefill.")
@click.option("--timeline", multiple=True, type=_IntList(), metavar="BATCH",
              help="Per-kernel timeline of a captured decode graph's replay at these batch sizes: duration, early "
                   "start under PDL and how far each kernel moves the step's end.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Timings: directory for results.jsonl and the profile/timeline files.")
@click.option("--shape", "shapes", multiple=True, type=_ShapeName(),
              help="Harness: random checkpoint shape (dense: qwen3-8b, llama3-8b, ministral3-8b, smollm2, tiny; "
                   "MoE, hybrid and MLA: qwen3-30b-a3b, gpt-oss-20b, qwen3.5-9b, qwen3.5-27b, qwen3.5-35b-a3b, "
                   "deepseek-v2-lite, deepseek-v3, with their own schemes, batches, contexts and fewer layers; "
                   "repeatable).")
@click.option("--scheme", "schemes", multiple=True, type=click.Choice(["bf16", "fp8-block", "fp8-tensor", "mxfp4"]),
              help="Harness: weight scheme (repeatable; default bf16, or a family shape's own: gpt-oss-20b "
                   "mxfp4 and bf16, deepseek-v3 fp8-block).")
@click.option("--tiny", is_flag=True,
              help="Harness, family shapes: their tiny variants on the cpu target (checks the whole run in seconds; "
                   "no GPU needed).")
@click.option("--layers", type=click.IntRange(1), help="Harness: override the layer count (quick runs).")
@click.option("--peers", is_flag=True, help="Harness: also transformers eager and static cache + torch.compile.")
@click.option("--peer-compile-batch", multiple=True, type=_IntList(),
              help="Harness: batch sizes for transformers + torch.compile (default 1,16,64; each recompiles).")
@click.option("--ab-pdl", is_flag=True,
              help="Harness: also decode with the plan's PDL binaries launched without programmatic dependent launch.")
@click.option("--ab-disable-pass", multiple=True, metavar="PASS",
              help="Harness: also compile, decode and prefill with this compiler pass turned off (repeatable).")
@click.option("--ab-table", multiple=True, type=click.Path(dir_okay=False, path_type=Path), metavar="TABLE",
              help="Harness: also compile and measure with TABLE's tuning entries winning over the shipped sm90 "
                   "table, as a user table does (repeatable).")
@click.option("--cold-compile", is_flag=True, help="Harness: compile with empty rdnac and Triton caches.")
@click.option("--checkpoints", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Harness: keep the random checkpoints in DIR and reuse those written from the same spec, seed "
                   "and generator (a later call on the same warm machine skips the 60-90 s write).")
def bench_cmd(plan, concurrency, input_len, output_len, num_prompts, device, seed, enforce_eager, as_json, decode,
              batch, context, prefill, profile, timeline, out, shapes, schemes, tiny, layers, peers,
              peer_compile_batch, ab_pdl, ab_disable_pass, ab_table, cold_compile, checkpoints):
    """Measure PLAN's serving latency and throughput; with --decode/--prefill its step timings on the GPU;
    with --shape (no PLAN) run the harness over a random checkpoint of that shape (see README.md).
    `rdnac bench serve --help`: load a running server over HTTP."""
    harness_only = {"--scheme": schemes, "--layers": layers, "--peers": peers,
                    "--peer-compile-batch": peer_compile_batch, "--ab-pdl": ab_pdl,
                    "--ab-disable-pass": ab_disable_pass, "--ab-table": ab_table, "--cold-compile": cold_compile,
                    "--checkpoints": checkpoints, "--tiny": tiny}
    if shapes:
        if plan:
            raise click.UsageError("requires PLAN or --shape, not both: --shape compiles its own plan")
        _check_shapes(shapes, schemes, tiny)
        if not tiny:
            require_gpu("--shape")
        from rdnac.bench.harness import BenchConfig, run_harness

        given = tuple(name for name, value in (("schemes", schemes), ("batch", batch), ("context", context),
                                               ("prefill", prefill)) if value)
        run_harness(BenchConfig(out=out, shapes=shapes, schemes=schemes or ("bf16",), layers=layers, tiny=tiny,
                                given=given, batch=_flat(batch) or BenchConfig.batch,
                                context=context or BenchConfig.context,
                                prefill=_flat(prefill) or BenchConfig.prefill, peers=peers,
                                peer_compile_batch=_flat(peer_compile_batch) or BenchConfig.peer_compile_batch,
                                profile=profile, timeline=_flat(timeline), ab_pdl=ab_pdl,
                                ab_disable_pass=ab_disable_pass, ab_table=ab_table, cold_compile=cold_compile,
                                checkpoints=checkpoints))
        return
    if plan is None:
        raise click.UsageError("requires PLAN (serving, or --decode/--prefill timings) or --shape (the harness)")
    given = [name for name, value in harness_only.items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)} require --shape (the harness); got PLAN")
    if decode or prefill or profile or timeline:
        require_gpu("--decode/--prefill/--profile/--timeline")
        _time_plan(plan, enforce_eager, out, decode, _flat(batch) or (1, 4, 16, 64), context or 256, _flat(prefill),
                   profile, _flat(timeline))
        return
    _serve(plan, concurrency, input_len, output_len, num_prompts, device, seed, enforce_eager, as_json)


def _check_shapes(shapes, schemes, tiny) -> None:
    """A dense shape takes the dense schemes and runs on the GPU only; a family shape needs one of its schemes."""
    from rdnac.bench.families import FAMILIES

    for shape in shapes:
        if shape not in FAMILIES:
            if tiny:
                raise click.UsageError(f"--tiny requires family shapes ({', '.join(FAMILIES)}); got {shape}")
            if "mxfp4" in schemes:
                raise click.UsageError(f"--scheme mxfp4 requires a MoE shape with MXFP4 experts (gpt-oss-20b); "
                                       f"got {shape}")
        elif schemes and not set(schemes) & set(FAMILIES[shape].schemes):
            raise click.UsageError(f"--shape {shape} requires --scheme {' or '.join(FAMILIES[shape].schemes)}; "
                                   f"got {', '.join(schemes)}")


def _time_plan(plan, enforce_eager, out, decode, batch, context, prefill, profile, timeline) -> None:
    import rdnac
    from rdnac.bench.decode import copy_bandwidth
    from rdnac.bench.harness import BenchConfig, Recorder, environment, measure_plan

    cfg = BenchConfig(out=out, batch=batch if decode else (), context=context, prefill=prefill, profile=profile,
                      timeline=timeline)
    emit = Recorder(out)
    emit(environment())
    llm = rdnac.load(plan, device="cuda", enforce_eager=enforce_eager)
    measure_plan(llm, cfg, emit, copy_bandwidth(), name=Path(plan).name.removesuffix(".msgpack"),
                 label={"plan": str(plan)}, profile=profile)


def _serve(plan, concurrency, input_len, output_len, num_prompts, device, seed, enforce_eager, as_json) -> None:
    from rdnac.bench.serving import bench, render

    if device is None:
        from rdnac.cli.main import _default_device

        device = _default_device(plan)
    levels = list(concurrency) or SERVING_LEVELS
    if min(levels) < 1 or input_len < 1 or output_len < 1:
        raise click.UsageError("--concurrency, --input-len and --output-len require positive integers")
    results = bench(plan, device=device, concurrency=levels, input_len=input_len, output_len=output_len,
                    num_prompts=num_prompts, seed=seed, enforce_eager=enforce_eager, quiet=as_json)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        render(results)
