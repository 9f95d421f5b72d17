"""`rdnac` command group. User errors print one line (`error: ...`) and exit 1."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click

from rdnac.cli.bench import bench_cmd
from rdnac.errors import RdnacError, RdnacWarning


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RdnacError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:  # the machine's part (a full disk, a file that vanished, permissions): one line
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """rdnac's own warnings as one `warning:` line; others in Python's usual form."""
    if issubclass(category, RdnacWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


# every option can come from the environment: RDNAC_<COMMAND>_<OPTION>, e.g. RDNAC_SERVE_PORT=9000
@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "RDNAC"})
@click.version_option(package_name="rdnac")
def cli():
    """rdnac: ahead-of-time compiler for LLMs on AMD GPUs."""
    warnings.showwarning = _show_warning


@cli.command("compile")
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True, help="Target name (see `rdnac targets`).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Plan path (default: MODEL.TARGET.msgpack).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype.")
@click.option("--max-model-len", type=int, help="Maximum tokens per sequence (default: the model's).")
@click.option("--disable-pass", "disable_passes", multiple=True, help="Skip a pass by name (repeatable).")
@click.option("--max-num-seqs", default=64, show_default=True, help="Largest decode batch the plan has kernels for.")
@click.option("--max-num-batched-tokens", default=2048, show_default=True,
              help="Largest prefill step; longer prompts are chunked.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--quantize", type=click.Choice(["fp8", "fp8-block", "int8", "mxfp4"]),
              help="FP8 linears for a float checkpoint: per-channel (fp8) or 128x128 blocks (fp8-block); "
                   "int8: W8A8 (per-channel int8 weights, per-token int8 activations); "
                   "mxfp4: MXFP4 experts for a float mixture-of-experts checkpoint.")
@click.option("--quantize-skip", "quantize_skip", multiple=True,
              help="With --quantize fp8/fp8-block/int8: a regex of node or weight names whose linears keep the "
                   "compute dtype (repeatable); replaces the default rule (int8: a GDN layer's in_proj); "
                   "`none` quantizes every linear.")
@click.option("--fp8-lm-head", is_flag=True, help="The logits projection in FP8 too (per-channel; float32 logits).")
@click.option("--pdl/--no-pdl", default=None,
              help="Programmatic dependent launch between kernels (default: on where the target has it, sm90+).")
@click.option("--tokenizer", help="An HF directory (or model id) whose tokenizer and chat template replace the "
                                  "checkpoint's (e.g. a GGUF's).")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="The paged K/V cache: auto = the compute dtype; fp8 = the target's e4m3 format (per-tensor "
                   "scale 1.0): half the bytes per token, twice the tokens.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Tensor-parallel ranks: shard the plan over N processes (gloo on cpu, NCCL/RCCL on GPUs).")
@click.option("--ep", is_flag=True, help="With --tp N: place MoE experts whole per rank instead of slicing each.")
@click.option("--ep-dispatch", type=click.Choice(["all-reduce", "all-to-all"]), default="all-reduce",
              show_default=True, help="With --ep: every rank runs its experts on every token and the partial sums "
                                      "are all-reduced, or each rank routes its slice of the tokens and sends them "
                                      "to the experts' ranks (reduce-scatter, all-to-all, all-gather).")
def compile_cmd(model, target, output, dtype, max_model_len, disable_passes, max_num_seqs, max_num_batched_tokens,
                quiet, quantize, quantize_skip, fp8_lm_head, pdl, tokenizer, kv_cache_dtype, tp, ep, ep_dispatch):
    """Compile MODEL (HF directory, .gguf file, ORG/NAME[@REVISION][:QUANT] from the Hugging Face cache, or
    demo:smollm2) into a plan."""
    from rdnac.compiler.pipeline import compile_model

    started = time.perf_counter()
    path = compile_model(model, target, output, dtype=dtype, max_model_len=max_model_len,
                         disable_passes=tuple(disable_passes), max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, quiet=quiet, quantize=quantize,
                         quantize_skip=tuple(quantize_skip) or None, fp8_lm_head=fp8_lm_head, pdl=pdl, tokenizer=tokenizer, kv_cache_dtype=kv_cache_dtype,
                         tp=tp, ep=ep, ep_dispatch=ep_dispatch)
    click.echo(f"wrote {path} ({time.perf_counter() - started:.1f} s)", err=True)


@cli.command("run")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--prompt", help="Plain text prompt.")
@click.option("--chat", "chat_text", is_flag=False, flag_value="", default=None,
              help="A user message, rendered with the plan's chat template; `--chat` alone starts an "
                   "interactive multi-turn chat.")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", type=float, help="0 is greedy (default: the plan's generation_config, else greedy).")
@click.option("--top-p", type=float, help="Default: the plan's generation_config, else off.")
@click.option("--top-k", type=int, help="Default: the plan's generation_config, else off.")
@click.option("--min-p", type=float, help="Default: the plan's generation_config, else off.")
@click.option("--seed", type=int, help="Sampling seed (default: random).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda for GPU-target plans, cpu for cpu plans.")
@click.option("--interpret", is_flag=True, help="Run a GPU plan's own kernels under the Triton interpreter (CPU).")
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs (debugging).")
@click.option("--verify-weights/--no-verify-weights", default=True, show_default=True,
              help="Check each weight tensor against the checksum the plan records, as it loads.")
def run_cmd(plan, prompt, chat_text, max_tokens, temperature, top_p, top_k, min_p, seed, device, interpret,
            enforce_eager, verify_weights):
    """Generate from PLAN, streaming text to stdout."""
    import rdnac

    if (prompt is None) == (chat_text is None):
        raise click.UsageError("requires exactly one of --prompt or --chat")
    if device is None:
        device = "cpu" if interpret else _default_device(plan)
    llm = rdnac.load(plan, device=device, interpret=interpret, enforce_eager=enforce_eager,
                     verify_weights=verify_weights, max_num_seqs=1)
    t = llm.load_timings
    if llm.device == "cuda":  # start-up on a GPU is worth a line; the cpu interpreter's is not
        click.echo(f"rdnac: loaded {plan} in {sum(v for k, v in t.items() if k.endswith('_s')):.2f} s (plan "
                   f"{t['plan_s']:.2f} s, kernels {t.get('kernels_s', 0):.2f} s, {t['weights_gb']:.2f} GB of weights "
                   f"{t['weights_s']:.2f} s)", err=True)
    params = llm.default_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, seed=seed)
    if interpret:
        click.echo(f"rdnac: running {plan}'s kernels under the Triton interpreter on the CPU: slow (at real model "
                   "sizes, minutes per token); for checking a plan, not for use", err=True)
    if chat_text == "":
        _interactive_chat(llm, params, interpret)
        return
    text = prompt if prompt is not None else chat_text
    _warn_max_tokens(llm, llm.encode_prompt(text, chat=chat_text is not None), params.max_tokens)
    _stream(llm, text, params, chat=chat_text is not None, show_progress=interpret)


def _default_device(plan) -> str:
    from rdnac.plans import read_plan

    return "cpu" if read_plan(plan, header_only=True).header["target"] == "cpu" else "cuda"


def _warn_max_tokens(llm, prompt_ids: list[int], max_tokens: int) -> bool:
    """Say so when --max-tokens is more than the context leaves after the prompt (the engine generates at
    most that many); returns whether it warned. A prompt that fills the context is the engine's error."""
    room = llm.max_model_len - len(prompt_ids)
    if max_tokens <= room or room < 1:
        return False
    click.echo(f"warning: --max-tokens {max_tokens} is beyond the context: the plan's max model length "
               f"{llm.max_model_len} leaves {room} tokens after the {len(prompt_ids)}-token prompt; generating at "
               f"most {room}", err=True)
    return True


def _stream(llm, prompt, params, chat: bool, show_progress: bool = False) -> str:
    """Generate one completion through the LLM's engine, writing text to stdout as it decodes; returns the text.
    With `show_progress` (the Triton interpreter: each token is slow) stderr gets a line per token instead,
    and the text comes whole at the end, so the two streams do not interleave mid-line."""
    text = ""
    started = time.perf_counter()
    for n, out in enumerate(llm.stream(prompt, params, chat=chat), 1):
        if show_progress:
            click.echo(f"rdnac: token {n} of at most {params.max_tokens} after "
                       f"{time.perf_counter() - started:.1f} s", err=True)
        else:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        text = out.text
    sys.stdout.write(text + "\n" if show_progress else "\n")
    sys.stdout.flush()
    return text


def _interactive_chat(llm, params, show_progress: bool = False) -> None:
    """Multi-turn chat: the whole conversation is re-rendered through the chat template each turn."""
    messages: list[dict] = []
    has_warned = False
    click.echo("chat with the model; an empty line or Ctrl-D ends it, /reset starts over", err=True)
    while True:
        sys.stderr.write("> ")  # the prompt goes to stderr: stdout carries only the model's text
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = []
            continue
        # the line's own newline is the Enter key, not part of the message (it changes the answer)
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        if not has_warned:
            has_warned = _warn_max_tokens(llm, llm.encode_prompt(list(messages), chat=True), params.max_tokens)
        reply = _stream(llm, list(messages), params, chat=True, show_progress=show_progress)
        messages.append({"role": "assistant", "content": reply})


@cli.command("inspect")
@click.argument("plan", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (layout in docs/inspect.md).")
@click.option("--decisions/--no-decisions", default=False, help="Also list the decision log (layers alike once).")
@click.option("--layers", "per_layer", is_flag=True, help="List every layer's rows (default: layers alike once).")
@click.option("--full", is_flag=True, help="Everything: every layer, the decision log, every kernel binary.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="Write the graph as ONNX (for Netron).")
@click.option("--diff", nargs=2, type=click.Path(dir_okay=False), help="Compare two plans: --diff A B.")
@click.option("--memory", help="Device memory to size the model state for (e.g. 16GiB, 80GB; default 16GiB): "
                               "how many tokens of state fit beside the weights.")
def inspect_cmd(plan, as_json, decisions, per_layer, full, html_path, onnx_path, diff, memory):
    """Show what PLAN holds: header, model, graph by op, weights, decisions."""
    from rdnac.cli.inspect import DEFAULT_MEMORY, parse_memory, render_text, summarize

    if diff:
        if plan or html_path or onnx_path:
            raise click.UsageError("--diff A B takes the two plans itself; requires no PLAN, --html or --onnx")
        from rdnac.cli.diff import diff_plans, render_diff

        result = diff_plans(*diff)
        if as_json:
            click.echo(json.dumps(result, indent=2, sort_keys=True))
        else:
            render_diff(result, per_layer=per_layer or full)
        return
    if plan is None:
        raise click.UsageError("requires PLAN (or --diff A B)")
    if html_path or onnx_path:
        from rdnac.cli.onnx_export import export_onnx
        from rdnac.cli.report import write_html

        for path, write in ((html_path, write_html), (onnx_path, export_onnx)):
            if path:
                click.echo(f"wrote {write(plan, path)}", err=True)
        return
    summary = summarize(plan, parse_memory(memory) if memory else DEFAULT_MEMORY)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        render_text(summary, show_decisions=decisions, per_layer=per_layer, full=full)


@cli.command("verify")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--against", "model", required=True, help="The checkpoint PLAN was compiled from (the reference).")
@click.option("--prompt", help="Text to run (default: a fixed sentence).")
@click.option("--token-ids", help="Comma-separated token ids to run instead of a prompt.")
@click.option("--atol", type=float, help="Tolerance on max abs error / max abs value, per value "
              "(default by plan dtype: float32 1e-4, float16 2e-2, bfloat16 1e-1; at least 0.15 for quantized weights).")
@click.option("--interpret", is_flag=True, help="Run a GPU plan's kernels under the Triton interpreter "
              "(the default where no GPU is visible).")
def verify_cmd(plan, model, prompt, token_ids, atol, interpret):
    """Run PLAN and an unfused float32 reference of MODEL side by side; name the first node that differs."""
    from rdnac.cli.verify import render_verify, verify_plan

    if prompt is not None and token_ids is not None:
        raise click.UsageError("requires at most one of --prompt or --token-ids")
    try:
        ids = [int(t) for t in token_ids.replace(",", " ").split()] if token_ids is not None else None
    except ValueError:
        raise click.BadParameter(f"requires comma-separated integers; got {token_ids!r}", param_hint="--token-ids")
    result = verify_plan(plan, model, prompt=prompt, token_ids=ids, tolerance=atol, interpret=interpret or None)
    render_verify(result)
    bad = result.first_failure
    if bad is not None:
        click.echo(f"error: {bad.node} ({bad.op}) is the first node over tolerance: {bad.value} error "
                   f"{bad.error:.3g} > {result.tolerance:g} (max abs error {bad.max_abs_error:.3g})", err=True)
        sys.exit(1)


@cli.command("serve")
@click.argument("model")
@click.option("--target", "-t", default="auto", show_default=True,
              help="For a MODEL that is not a plan: the target to compile for (auto: this machine's GPU, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="For a MODEL that is not a plan: compute dtype of the compile.")
@click.option("--quantize", type=click.Choice(["fp8", "fp8-block", "int8", "mxfp4"]),
              help="For a MODEL that is not a plan: as `rdnac compile --quantize`.")
@click.option("--tokenizer", help="For a GGUF MODEL: an HF directory (or model id) whose tokenizer replaces the GGUF's.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="RDNAC_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer KEY` on /v1 routes (the environment or --api-key-file keep it "
                   "out of the process list).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True),
              help="Read the API key from this file (its first line).")
@click.option("--auth-metrics", is_flag=True, help="Require the API key on GET /metrics too.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=4 << 20, show_default=True,
              help="Largest request body; a larger one gets 413 before it is read.")
@click.option("--model-name", help="Model id clients send (default: the plan's model name).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda for GPU-target plans, cpu for cpu plans.")
@click.option("--max-model-len", type=int, help="Most tokens per sequence, up to the plan's (default: the plan's).")
@click.option("--max-num-seqs", type=int, help="Most sequences scheduled at once, up to the plan's (default: the plan's).")
@click.option("--max-num-batched-tokens", type=int, help="Most tokens per step, up to the plan's (default: the plan's).")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=float,
              help="Fraction of GPU memory the KV cache may fill up to.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
              help="Reuse KV blocks of shared prompt prefixes (default: on where the plan's state is all paged).")
@click.option("--allowed-origins", help="CORS origins, comma-separated or a JSON list (default: no CORS).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error", "critical"]), default="info",
              show_default=True)
@click.option("--log-file", type=click.Path(dir_okay=False), help="Append the log to this file too.")
@click.option("--verify-weights/--no-verify-weights", default=True, show_default=True,
              help="Check each weight tensor against the checksum the plan records, as it loads.")
@click.option("--chat-template", type=click.Path(dir_okay=False, exists=True),
              help="A Jinja chat template file to use instead of the plan's.")
@click.option("--max-n", type=click.IntRange(1), default=16, show_default=True,
              help="Most choices (`n`) one request may ask for.")
def serve_cmd(model, target, dtype, quantize, tokenizer, host, port, api_key, api_key_file, auth_metrics,
              max_body_bytes, model_name, device, max_model_len, max_num_seqs, max_num_batched_tokens,
              gpu_memory_utilization, enable_prefix_caching, allowed_origins, log_level, log_file, verify_weights,
              chat_template, max_n):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    MODEL is a plan file, or anything `rdnac compile` takes (directory, .gguf, ORG/NAME[@REV][:QUANT],
    demo:NAME): compiled on first use into the plan cache (~/.cache/rdnac/plans) and reused after."""
    from rdnac.serve import read_api_key, require_server_deps, serve
    from rdnac.serve.ops import configure_logging, describe_limits, parse_origins, plan_facts, prefix_caching, \
        resolve_model

    require_server_deps()
    configure_logging(log_level, log_file)
    origins = parse_origins(allowed_origins)
    key = read_api_key(api_key, api_key_file)
    # the plan is compiled with room for the serve-time limits asked (never below compile's defaults)
    compile_options = {"dtype": dtype, "quantize": quantize, "tokenizer": tokenizer, "max_model_len": max_model_len,
                       "max_num_seqs": max(max_num_seqs or 0, 64),
                       "max_num_batched_tokens": max(max_num_batched_tokens or 0, 2048)}
    plan = resolve_model(model, target, compile_options)
    facts = plan_facts(plan)
    limits = describe_limits(facts, max_model_len, max_num_seqs, max_num_batched_tokens)
    is_caching, caching_note = prefix_caching(enable_prefix_caching, facts)
    serve(str(plan), host=host, port=port, api_key=key, auth_metrics=auth_metrics,
          max_body_bytes=max_body_bytes, model_name=model_name, device=device, max_model_len=max_model_len,
          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
          gpu_memory_utilization=gpu_memory_utilization,
          enable_prefix_caching=is_caching, verify_weights=verify_weights, allowed_origins=origins,
          log_level=log_level, log_config=False, notes=(limits, caching_note), chat_template=chat_template,
          max_n=max_n)


@cli.command("tune")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False),
              help="Tuning table to write (default: ~/.cache/rdnac/tuned/TARGET.json, read by every compile).")
@click.option("--context", "contexts", type=click.IntRange(1), multiple=True,
              help="Cached tokens per sequence decode attention is timed at (repeatable; default 1024). With "
                   "several, the config with the smallest worst slowdown across them is kept.")
def tune_cmd(plan, out, contexts):
    """Measure GEMM and attention configs for PLAN's shapes on this machine's GPU.

    Later compiles for the plan's target take the measured configs ahead of the cost model's
    guesses (`rdnac inspect --decisions` says which was used); recompile the plan to use them."""
    from rdnac.compiler import tune, tuning
    from rdnac.plans import read_plan

    target = read_plan(plan, header_only=True).header["target"]
    jobs = tune.problems_from_plan(plan)
    click.echo(f"rdnac: tuning {len(jobs)} problems of {plan} for {target}", err=True)
    results = tune.search(jobs, target, log=lambda line: click.echo(line, err=True),
                          contexts=tuple(contexts) or (tune.CONTEXT,))
    path = Path(out) if out else tuning.table_paths(target)[-1]
    tune.save_results(path, results)
    click.echo(f"wrote {len(results)} measured configs to {path}; recompile the plan to use them")


@cli.command("targets")
def targets_cmd():
    """List the targets and their probed capabilities."""
    from rdnac.cli.targets import render_targets

    render_targets()


cli.add_command(bench_cmd)  # its options and modes live with it, in rdnac/cli/bench.py


def main():
    cli(prog_name="rdnac")


if __name__ == "__main__":
    main()
