"""`rdnac` command group. User errors print one line (`error: ...`) and exit 1."""

from __future__ import annotations

import json
import sys
import time

import click

from rdnac.errors import RdnacError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RdnacError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="rdnac")
def cli():
    """rdnac: ahead-of-time compiler for LLMs on AMD GPUs."""


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
def compile_cmd(model, target, output, dtype, max_model_len, disable_passes, max_num_seqs, max_num_batched_tokens,
                quiet):
    """Compile MODEL (HF directory, .gguf file, or demo:smollm2) into a plan."""
    from rdnac.compiler.pipeline import compile_model

    started = time.perf_counter()
    path = compile_model(model, target, output, dtype=dtype, max_model_len=max_model_len,
                         disable_passes=tuple(disable_passes), max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, quiet=quiet)
    click.echo(f"wrote {path} ({time.perf_counter() - started:.1f} s)", err=True)


@cli.command("run")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--prompt", help="Plain text prompt.")
@click.option("--chat", "chat_text", help="A user message, rendered with the plan's chat template.")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--seed", type=int, help="Sampling seed (with --temperature > 0).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda for GPU-target plans, cpu for cpu plans.")
@click.option("--interpret", is_flag=True, help="Run a GPU plan's own kernels under the Triton interpreter (CPU).")
def run_cmd(plan, prompt, chat_text, max_tokens, temperature, seed, device, interpret):
    """Generate from PLAN, streaming text to stdout."""
    import rdnac

    if (prompt is None) == (chat_text is None):
        raise click.UsageError("requires exactly one of --prompt or --chat")
    if device is None:
        from rdnac.plans import read_plan

        device = "cpu" if interpret or read_plan(plan, header_only=True).header["target"] == "cpu" else "cuda"
    engine = rdnac.load(plan, device=device, interpret=interpret)
    ids: list[int] = []
    printed = ""

    def on_token(_index: int, token: int) -> None:
        nonlocal printed
        ids.append(token)
        text = engine.tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    engine.generate([prompt if prompt is not None else chat_text], max_tokens=max_tokens, temperature=temperature,
                    seed=seed, chat=chat_text is not None, on_token=on_token)
    sys.stdout.write(engine.tokenizer.decode(ids)[len(printed):] + "\n")


@cli.command("inspect")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (layout in docs/inspect.md).")
@click.option("--decisions/--no-decisions", default=False, help="Also list the decision log.")
def inspect_cmd(plan, as_json, decisions):
    """Show what PLAN holds: header, model, graph by op, weights, decisions."""
    from rdnac.cli.inspect import render_text, summarize

    summary = summarize(plan)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        render_text(summary, show_decisions=decisions)


@cli.command("targets")
def targets_cmd():
    """List the targets and their probed capabilities."""
    from rdnac.cli.targets import render_targets

    render_targets()


def main():
    cli(prog_name="rdnac")


if __name__ == "__main__":
    main()
