"""The operations side of `rdnac serve`: what a deployment sets around the API.

    configure_logging     --log-level / --log-file through the `logging` module (uvicorn's loggers too)
    install               GET /version and CORS (--allowed-origins, Starlette's CORSMiddleware)
    prefix_caching        on by default where the plan's state is all paged; off, logged, where it is not
    describe_limits       the plan's limits beside the ones this server runs with (one line)
    (the CLI hands both lines to `run_server`, printed once the port is bound)
    resolve_model         `rdnac serve MODEL`: a plan file as given, else the plan cache (compile on first use)

`app.py` calls `install` once; the CLI calls the rest before the model loads.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rdnac.errors import RdnacError

log = logging.getLogger("rdnac.serve")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", log_file: str | None = None) -> None:
    """rdnac's and uvicorn's loggers at `level`, to stderr, and to `log_file` too when given."""
    if level.lower() not in LOG_LEVELS:
        raise RdnacError(f"--log-level requires one of {', '.join(LOG_LEVELS)}; got {level!r}")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as e:
            raise RdnacError(f"--log-file requires a file rdnac can append to; got {log_file}: "
                             f"{e.strerror or e}") from None
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in ("rdnac", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.handlers = list(handlers) if name in ("rdnac", "uvicorn") else []
        logger.propagate = name not in ("rdnac", "uvicorn")  # children reach their parent's handlers once


def version_info() -> dict:
    import rdnac

    info = {"version": rdnac.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # the server always has torch; /version must still answer without it in tests of ops
        pass
    return info


def install(app, allowed_origins: list[str] | None = None) -> None:
    """GET /version (vLLM's shape: {"version": ...}), and CORS for `allowed_origins` (none: no CORS headers)."""

    @app.get("/version")
    async def version():
        return version_info()

    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        # browsers send the API key as a header: credentials and any header/method, as vLLM allows
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])


def parse_origins(value: str | None) -> list[str] | None:
    """--allowed-origins: a JSON list (vLLM's form) or comma-separated origins."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            origins = json.loads(text)
        except ValueError as e:
            raise RdnacError(f"--allowed-origins requires a JSON list or comma-separated origins; got {value!r} "
                             f"({e})") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise RdnacError(f"--allowed-origins requires a list of strings; got {value!r}")
        return origins
    return [o.strip() for o in text.split(",") if o.strip()]


def plan_facts(plan: str | Path) -> dict:
    """The plan's limits and whether its state is all paged, from the header and body without weights."""
    from rdnac.ir.graph import Graph
    from rdnac.ir.state import bytes_per_sequence
    from rdnac.plans import read_plan

    loaded = read_plan(plan)
    runtime = loaded.body["runtime"]
    graph = Graph.from_dict(loaded.body["graph"])
    return {"max_model_len": runtime["max_model_len"], "max_num_seqs": runtime["max_num_seqs"],
            "max_num_batched_tokens": runtime["max_num_batched_tokens"],
            "has_sequence_state": bool(bytes_per_sequence(graph.state)), "target": loaded.header["target"]}


def prefix_caching(requested: bool | None, facts: dict) -> tuple[bool, str]:
    """(on, why): as asked, else on where the plan allows it. A plan with per-sequence state (linear
    attention, convolutions) cannot restore a cached prefix of that state: off there, and said."""
    if facts["has_sequence_state"]:
        if requested:
            raise RdnacError("--enable-prefix-caching requires a plan whose state is all paged; this plan keeps "
                             "per-sequence state (recurrent/conv), which a cached prefix cannot restore; drop the flag")
        return False, "prefix caching off: the plan keeps per-sequence state, which a cached prefix cannot restore"
    if requested is None:
        return True, "prefix caching on (the plan's state is all paged; --no-enable-prefix-caching turns it off)"
    return requested, f"prefix caching {'on' if requested else 'off'} (as asked)"


def describe_limits(facts: dict, max_model_len: int | None, max_num_seqs: int | None,
                    max_num_batched_tokens: int | None) -> str:
    """One line: the limits served with, each beside the plan's (the most a serve-time flag may ask)."""
    asked = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
             "max_num_batched_tokens": max_num_batched_tokens}
    parts = []
    for key, flag in (("max_model_len", "max model length"), ("max_num_seqs", "sequences"),
                      ("max_num_batched_tokens", "batched tokens")):
        plan_limit = facts[key]
        value = asked[key]
        if value is not None and value > plan_limit:
            raise RdnacError(f"--{key.replace('_', '-')} {value} requires at most the plan's {plan_limit}; "
                             f"serve with --{key.replace('_', '-')} {plan_limit} or less, or recompile with a "
                             f"larger --{key.replace('_', '-')}")
        parts.append(f"{flag} {value if value is not None else plan_limit} (plan: {plan_limit})")
    return "limits: " + ", ".join(parts)


def resolve_model(model: str, target: str, compile_options: dict) -> Path:
    """MODEL as a plan: a .msgpack file as given; anything else through the plan cache (`--target auto`:
    this machine's GPU, else cpu), compiled on first use and reused after."""
    path = Path(model)
    if path.suffix == ".msgpack" or path.is_file() and path.suffix != ".gguf":
        if not path.is_file():
            raise RdnacError(f"{model}: requires an existing plan file (or a model: a directory, .gguf, model id "
                             f"or demo:NAME, compiled on first use); got no such file")
        return path
    import time

    from rdnac.compiler.plan_cache import cached_plan

    started = time.perf_counter()
    plan, was_cached = cached_plan(model, target, compile_options)
    how = "reused the cached plan" if was_cached else "compiled"
    log.info("%s %s in %.1f s", how, plan, time.perf_counter() - started)
    print(f"rdnac: {how} {plan} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return plan
