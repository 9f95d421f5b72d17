"""The OpenAI-compatible HTTP API of `rdnac serve` (FastAPI), and the uvicorn server that runs it.

    GET  /health               200, or 503 with the reason once the engine has failed for good
    GET  /version              {"version": ...} (ops.py, with CORS for --allowed-origins)
    GET  /metrics              Prometheus text (behind the API key with --auth-metrics)
    GET  /v1/models            the one model served
    POST /v1/completions       prompt: string, token ids, or a list of either (handlers.py)
    POST /v1/chat/completions  messages, rendered with the plan's chat template (handlers.py)

Handlers never touch the LLMEngine: they read the body (at most
--max-body-bytes, else 413 before the rest is read), parse and tokenize it in
a worker thread, check the prompt against the context, and only then submit
token ids to the engine thread (`worker.EngineWorker`) and await its events.
A client that goes away mid-request has its engine requests aborted, which
frees their KV blocks; a request that fails in the engine fails alone.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import socket
import sys
import time
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdnac.errors import RdnacError
from rdnac.serve import handlers
from rdnac.serve.chat_output import ChatStyle
from rdnac.serve.echo import Echo, prompt_logprobs
from rdnac.serve.ops import install as install_ops
from rdnac.serve.protocol import APIError, choice_seed, finish_reason, parse_request, sampling_params, usage
from rdnac.serve.structured import GuideCompiler
from rdnac.serve.worker import ClientDisconnected, EngineFailed, EngineWorker, RequestGroup


class _Choice:
    """What one prompt's engine request has produced so far."""

    def __init__(self):
        self.text, self.token_ids, self.logprobs, self.top, self.finish_reason = "", [], [], [], None

    def add(self, out) -> tuple[list[float], list]:
        """Record one RequestOutput; returns the logprobs and top alternatives of its new tokens."""
        self.text, self.token_ids = out.text, list(out.token_ids)
        new_logprobs = list(out.logprobs[-len(out.new_token_ids):]) if out.logprobs and out.new_token_ids else []
        new_top = list(out.top_logprobs or [])
        self.logprobs += new_logprobs
        self.top += new_top
        self.finish_reason = finish_reason(out)
        return new_logprobs, new_top


DEFAULT_MAX_BODY_BYTES = 4 << 20  # a full 128k-token context as JSON token ids fits in under 1 MB
DEFAULT_MAX_N = 16  # choices per request (`n`); each is a sequence in the engine


class Server:
    def __init__(self, worker: EngineWorker, llm, model_name: str, max_body_bytes: int, max_n: int = DEFAULT_MAX_N):
        self.worker = worker
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.max_n = max_n
        self.vocab_size = llm.runner.vocab_size
        self.chat_style = ChatStyle(self.tokenizer.chat_template, self.tokenizer)
        self.guides = GuideCompiler(self.tokenizer, self.vocab_size)
        self.created = int(time.time())
        # unset sampling fields take the plan's generation_config exactly as `rdnac run` does
        self.generation_config = llm.plan.body.get("generation_config") or {}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def params(self, req, max_tokens: int, logprobs: bool, top_logprobs: int = 0) -> list:
        """One SamplingParams per choice (`n` of them, seeds derived from the request's); a response_format's
        grammar compiled in a worker thread."""
        if req.n > self.max_n:
            raise APIError(400, f"n requires at most {self.max_n} choices per request (this server's cap); got "
                                f"{req.n}", param="n")
        guide = await asyncio.to_thread(self.guides.guide, req.response_format) if req.response_format else None
        biases = req.token_biases(self.vocab_size)
        try:
            return [sampling_params(req, self.generation_config, max_tokens, logprobs, top_logprobs, guide=guide,
                                    logit_bias=biases, seed=choice_seed(req.seed, i)) for i in range(req.n)]
        except RdnacError as e:
            raise APIError(400, str(e)) from None

    async def read(self, request: Request, cls):
        """The body, parsed and validated off the event loop; 413 as soon as it outgrows --max-body-bytes."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(size, limit)
            parts.append(part)
        return await asyncio.to_thread(_parse, cls, b"".join(parts))

    async def encode(self, prompts: list, chat: bool) -> list[list[int]]:
        """Token ids of each prompt, tokenized in a worker thread (never on the engine thread), each checked
        against the context before any engine work."""
        param = "messages" if chat else "prompt"
        encoded = []
        for prompt in prompts:
            is_ids = isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict))
            if is_ids:
                self.check_length(len(prompt), param)
            try:
                ids = await asyncio.to_thread(self.llm.encode_prompt, prompt, chat)
            except RdnacError as e:  # bad token ids, bad template: the client's to fix
                raise APIError(400, str(e), param=param) from None
            self.check_length(len(ids), param)
            encoded.append(ids)
        return encoded

    def check_length(self, num_tokens: int, param: str) -> None:
        if num_tokens >= self.max_model_len:
            raise APIError(400, f"prompt of {num_tokens} tokens requires fewer than the plan's max model length "
                                f"{self.max_model_len}; shorten the prompt", param=param,
                           code="context_length_exceeded")

    async def start(self, request_id: str, prompts: list, params: list, chat: bool,
                    token_ids: list[list[int]] | None = None) -> RequestGroup:
        """Submit each prompt once per choice (params: one per choice): choice i * n + j is prompt i's j-th."""
        token_ids = token_ids if token_ids is not None else await self.encode(prompts, chat)
        n = len(params)
        group = RequestGroup(self.worker, request_id, len(token_ids) * n)
        group.submit([ids for ids in token_ids for _ in range(n)], [p for _ in token_ids for p in params], chat=False,
                     num_choices=n)
        try:
            await group.admitted()
        except RdnacError as e:  # e.g. more KV blocks than the pool holds: the client's to fix
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        except EngineFailed as e:
            raise self.failed(e) from None
        except asyncio.CancelledError:
            group.abort()
            raise
        return group

    def failed(self, e: EngineFailed) -> APIError:
        """500 when this request alone failed in the engine; 503 once the engine has failed for good."""
        return APIError(500 if self.worker.is_alive else 503, str(e), type="server_error")

    async def render_chat(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> tuple[str, list[int]]:
        """The prompt text and its token ids, rendered as transformers' apply_chat_template(messages, tools=tools,
        add_generation_prompt=True, **kwargs) does, in a worker thread, checked against the context."""
        tok = self.tokenizer

        def render():
            text = tok.apply_chat_template(messages, True, tools, **kwargs)
            return text, tok.encode(text, add_special_tokens=False)
        try:
            text, ids = await asyncio.to_thread(render)
        except RdnacError as e:  # a template that raises, a plan without a tokenizer: the client's to fix
            raise APIError(400, str(e), param="messages") from None
        self.check_length(len(ids), "messages")
        return text, ids

    async def echo(self, prompt, ids: list[int], num_top: int | None) -> Echo:
        """The prompt as an echo; with `num_top` (logprobs) its prompt logprobs, scored in a worker thread."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False)
        if num_top is None:
            return Echo(text, None)
        try:
            return await asyncio.to_thread(prompt_logprobs, self.llm, text, ids, num_top,
                                           self.token_strings, self.top_strings)
        except RdnacError as e:
            raise APIError(400, str(e), param="prompt") from None

    def static_stream(self, events: list[dict]) -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            for data in events:
                yield _sse(data)
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    def top_strings(self, top: list[list[tuple[int, float]]]) -> list[list[tuple[str, float]]]:
        return [[(self.tokenizer.decode([t], skip_special_tokens=False), lp) for t, lp in alts] for alts in top]

    async def collect(self, request: Request, group: RequestGroup, num_choices: int) -> list[_Choice]:
        """Run a non-streaming request to the end; aborts it if the client disconnects first."""
        choices = [_Choice() for _ in range(num_choices)]
        watcher = asyncio.create_task(_watch_disconnect(request, group))
        try:
            async for index, out in group.outputs():
                choices[index].add(out)
        except EngineFailed as e:
            raise self.failed(e) from None
        except ClientDisconnected:  # nobody reads this answer; 499 is nginx's "client closed request"
            raise APIError(499, "the client disconnected before the response was complete") from None
        finally:
            watcher.cancel()
            if not group.is_finished:
                group.abort()
        return choices

    def stream(self, group: RequestGroup, first: list[dict], chunk: Callable[..., dict | None],
               envelope_of: Callable[..., dict], include_usage: bool, n: int = 1) -> StreamingResponse:
        """SSE: `first` chunks, one chunk per engine output (`chunk(index, out, new_logprobs, new_top, choice)`),
        an optional usage chunk, then [DONE]."""

        async def events() -> AsyncIterator[str]:
            choices = [_Choice() for _ in group.ids]
            extra = {"usage": None} if include_usage else {}
            try:
                for choice in first:
                    yield _sse(envelope_of([choice], **extra))
                async for index, out in group.outputs():
                    data = chunk(index, out, *choices[index].add(out), choices[index])
                    if data is not None:
                        yield _sse(envelope_of([data], **extra))
                if include_usage:
                    num_completion = sum(len(c.token_ids) for c in choices)
                    yield _sse(envelope_of([], usage=usage(sum(group.num_prompt_tokens[::n]), num_completion)))
            except EngineFailed as e:
                yield _sse(self.failed(e).body())
            finally:  # also runs when Starlette cancels the stream because the client disconnected
                if not group.is_finished:
                    group.abort()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request, group: RequestGroup) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            group.client_disconnected()
            return


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body requires at most {limit} bytes (rdnac serve --max-body-bytes); "
                         f"got {size}{'' if size <= limit else ' or more'}", code="request_too_large")


def _parse(cls, raw: bytes):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also an integer of > 4300 digits, or nesting past the stack
        raise APIError(400, f"the request body requires valid JSON; {type(e).__name__}: {e}") from None
    return parse_request(cls, body)


def _check_auth_metrics(auth_metrics: bool, api_key: str | None) -> None:
    if auth_metrics and api_key is None:
        raise RdnacError("--auth-metrics requires an API key; got none; pass --api-key-file, RDNAC_API_KEY or "
                         "--api-key")


def create_app(worker: EngineWorker, llm, model_name: str | None = None, api_key: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, auth_metrics: bool = False, max_n: int = DEFAULT_MAX_N,
               chat_template: str | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app over a started EngineWorker (of `llm.engine`); `llm` supplies the tokenizer, limits and
    plan. With `auth_metrics`, GET /metrics requires the API key too. `chat_template` (Jinja text) replaces
    the plan's; `max_n` caps the choices of one request."""
    _check_auth_metrics(auth_metrics, api_key)
    if chat_template is not None:
        llm.tokenizer.chat_template = chat_template
    server = Server(worker, llm, model_name or llm.plan.header["model"]["name"], max_body_bytes, max_n)
    app = FastAPI(title="rdnac", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "requires the header `Authorization: Bearer <key>` with the server's API key",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not worker.is_alive:
            return JSONResponse({"status": "error", "error": worker.error or "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(check_api_key)] if auth_metrics else [])
    async def metrics():
        return PlainTextResponse(worker.metrics.render(server.model_name), media_type="text/plain; version=0.0.4")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "rdnac", "max_model_len": server.max_model_len}]}

    @v1.post("/completions")
    async def completions(request: Request):
        return await handlers.completions(server, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await handlers.chat_completions(server, request)

    app.include_router(v1)
    install_ops(app, allowed_origins)
    return app


def run_server(plan: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               model_name: str | None = None, device: str | None = None, log_level: str = "info",
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, auth_metrics: bool = False, max_n: int = DEFAULT_MAX_N,
               chat_template: str | None = None, allowed_origins: list[str] | None = None, log_config: bool = True,
               notes: tuple[str, ...] = (), **llm_options) -> None:
    """Load PLAN, start the engine thread and serve until interrupted (`rdnac serve`). `notes` are printed
    once the port is bound (a taken port fails first, alone); `chat_template`: a Jinja file to use instead
    of the plan's template."""
    import uvicorn

    import rdnac

    _check_auth_metrics(auth_metrics, api_key)  # before the model loads
    template = read_chat_template(chat_template) if chat_template is not None else None
    sock = bind(host, port)  # before loading the model: a taken port fails at once, never after "serving on"
    try:
        for note in notes:
            print(f"rdnac: {note}", file=sys.stderr)
        if device is None:
            from rdnac.plans import read_plan

            device = "cpu" if read_plan(plan, header_only=True).header["target"] == "cpu" else "cuda"
        llm = rdnac.load(plan, device=device, **{k: v for k, v in llm_options.items() if v is not None})
        worker = EngineWorker(llm.engine)
        worker.start()
        try:
            app = create_app(worker, llm, model_name, api_key, max_body_bytes=max_body_bytes,
                             auth_metrics=auth_metrics, max_n=max_n, chat_template=template,
                             allowed_origins=allowed_origins)
            name = app.state.server.model_name
            print(f"rdnac: serving {name} from {plan} on http://{host}:{port} (device {device})", file=sys.stderr)
            # with log_config False the loggers are as `ops.configure_logging` (--log-level, --log-file) set them
            extra = {} if log_config else {"log_config": None}
            config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                                    **extra)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            worker.shutdown()
    finally:
        sock.close()


def read_chat_template(path: str) -> str:
    """--chat-template FILE: a Jinja template, checked to compile before the model loads."""
    import jinja2

    from rdnac.runtime.chat import render_chat

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise RdnacError(f"--chat-template requires a readable UTF-8 Jinja file; got {path}: {e}") from None
    try:
        render_chat(text, [{"role": "user", "content": "hi"}], {})
    except (jinja2.TemplateSyntaxError, RdnacError) as e:
        raise RdnacError(f"--chat-template requires a Jinja chat template that renders; got {path}: {e}") from None
    return text


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RdnacError(f"rdnac serve requires a free port; got {host}:{port} already in use; stop what "
                             f"listens there or pick another with --port") from None
        raise RdnacError(f"rdnac serve requires an address it can bind; got {host}:{port}: {e.strerror or e}; "
                         f"check --host and --port") from None
