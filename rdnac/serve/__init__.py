"""`rdnac serve`: an OpenAI-compatible HTTP server over the runtime's LLMEngine.

    worker.py    the one thread that owns the LLMEngine; the asyncio bridge to it
    protocol.py  OpenAI request validation -> SamplingParams; response shapes
    app.py       the FastAPI app's wiring, the Server shared by its routes (SSE streaming), the uvicorn runner
    handlers.py  the two generation routes: /v1/completions and /v1/chat/completions
    metrics.py   Prometheus text for GET /metrics (rdnac's series and vLLM's names)
    ops.py       /version, CORS, logging, prefix-caching default, serve-time limits, MODEL -> plan
    chat_output.py  an assistant message from a chat output: content, reasoning_content, tool_calls
    tools.py     tools checked for the template; tool calls parsed (Hermes/Qwen, Llama 3, Mistral, harmony)
    tool_scan.py tool calls in an output still growing: names and arguments as streamed deltas send them
    reasoning.py `<think>` reasoning split from the answer
    echo.py      echo and prompt logprobs on /v1/completions (lm-eval's loglikelihood)
    structured.py  response_format (json_object, json_schema, regex, grammar) as an xgrammar logits mask

fastapi and uvicorn come with the `serve` extra (`pip install 'rdnac[serve]'`), xgrammar with the
`structured` extra (only response_format needs it: without it, such a request gets a 400 saying so);
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


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key (or RDNAC_API_KEY) or from the first line of --api-key-file; one at most."""
    if api_key is not None and api_key_file is not None:
        raise RdnacError(f"rdnac serve requires one API key; got --api-key (or RDNAC_API_KEY) and --api-key-file "
                         f"{api_key_file}; keep one")
    if api_key_file is not None:
        try:
            lines = open(api_key_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RdnacError(f"--api-key-file requires a readable UTF-8 file; got {api_key_file}: {e}") from None
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            raise RdnacError(f"--api-key-file requires the key on its first line; got an empty first line in "
                             f"{api_key_file}")
    if api_key is not None and not api_key.strip():
        raise RdnacError("--api-key requires a non-empty key; got an empty one (is RDNAC_API_KEY set but empty?)")
    return api_key


def serve(plan: str, **options) -> None:
    """Serve PLAN over HTTP until interrupted; options as in `rdnac serve --help`."""
    require_server_deps()
    from rdnac.serve.app import run_server

    run_server(plan, **options)
