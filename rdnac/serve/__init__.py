"""`rdnac serve`: an OpenAI-compatible HTTP server over the runtime's LLMEngine.

    worker.py    the one thread that owns the LLMEngine; the asyncio bridge to it
    protocol.py  OpenAI request validation -> SamplingParams; response shapes
    app.py       the FastAPI routes, SSE streaming, and the uvicorn runner
    metrics.py   Prometheus text for GET /metrics

fastapi and uvicorn come with the `serve` extra (`pip install 'rdnac[serve]'`);
nothing outside this package imports them, so the compiler and runtime work
without them.
"""

from __future__ import annotations

from rdnac.errors import RdnacError


def require_server_deps() -> None:
    missing = []
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RdnacError(f"rdnac serve requires fastapi and uvicorn; got no {' and no '.join(missing)} in this "
                         f"environment; install them with: pip install 'rdnac[serve]'")


def serve(plan: str, **options) -> None:
    """Serve PLAN over HTTP until interrupted; options as in `rdnac serve --help`."""
    require_server_deps()
    from rdnac.serve.app import run_server

    run_server(plan, **options)
