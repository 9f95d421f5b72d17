"""The handlers of `rdnac serve`'s two generation routes, POST /v1/completions and POST /v1/chat/completions.

app.py wires them into the FastAPI app; each takes the app's `Server` (body reading, tokenizing, engine
submission and SSE streaming, shared by both) and the request, and returns the response: a JSON body, or
an SSE stream of chunks.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from rdnac.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs,
                                  completion_logprobs, envelope, finish_reason, usage)
from rdnac.serve.tools import check_tools, forced_format

if TYPE_CHECKING:  # app.py imports this module
    from rdnac.serve.app import Server


async def completions(server: Server, request: Request):
    """POST /v1/completions: prompt as a string, token ids, or a list of either; echo and prompt logprobs."""
    req = await server.read(request, CompletionRequest)
    server.check_model(req.model)
    prompts, n = req.prompts(), req.n
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    params = await server.params(req, max(max_tokens, 1), logprobs=req.logprobs is not None,
                                 top_logprobs=req.logprobs or 0)
    token_ids = await server.encode(prompts, chat=False)
    # echo: the prompt (and its logprobs, each token's given its prefix) before each choice's completion
    echoes = [await server.echo(p, ids, req.logprobs) for p, ids in zip(prompts, token_ids)] if req.echo else None
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def wrap(choices, **extra):
        return envelope(request_id, "text_completion", server.model_name, created, choices, **extra)

    def logprobs_of(token_ids, logprobs, top, offset=0, echo=None):
        if req.logprobs is None:
            return None
        result = completion_logprobs(server.token_strings(token_ids), logprobs,
                                     server.top_strings(top) if req.logprobs else None, offset)
        return echo.join(result) if echo is not None else result

    def echo_of(index: int):
        return echoes[index // n] if echoes is not None else None

    if max_tokens == 0:  # lm-eval's loglikelihood: the prompt scored, nothing generated
        choices = [{"index": i, "text": echo_of(i).text, "finish_reason": "length",
                    "logprobs": echo_of(i).logprobs if req.logprobs is not None else None}
                   for i in range(len(prompts) * n)]
        num_prompt = sum(len(ids) for ids in token_ids)
        if req.stream:
            return server.static_stream([wrap([c]) for c in choices] + (
                [wrap([], usage=usage(num_prompt, 0))] if req.include_usage else []))
        return JSONResponse(wrap(choices, usage=usage(num_prompt, 0)))

    group = await server.start(request_id, prompts, params, chat=False, token_ids=token_ids)

    if req.stream:
        first = [{"index": i, "text": echo_of(i).text, "finish_reason": None,
                  "logprobs": echo_of(i).logprobs if req.logprobs is not None else None}
                 for i in range(len(group.ids))] if echoes is not None else []

        def chunk(index, out, new_logprobs, new_top, _choice):
            if not (out.new_text or out.finished or (new_logprobs and req.logprobs is not None)):
                return None
            offset = len(out.text) - len(out.new_text) + (len(echo_of(index).text) if echoes else 0)
            return {"index": index, "text": out.new_text, "finish_reason": finish_reason(out),
                    "logprobs": logprobs_of(out.new_token_ids, new_logprobs, new_top, offset)}
        return server.stream(group, first, chunk, wrap, req.include_usage, n)

    choices = await server.collect(request, group, len(group.ids))
    body = wrap([{"index": i, "text": (echo_of(i).text if echoes else "") + c.text,
                  "finish_reason": c.finish_reason,
                  "logprobs": logprobs_of(c.token_ids, c.logprobs, c.top, echo=echo_of(i))}
                 for i, c in enumerate(choices)],
                usage=usage(sum(group.num_prompt_tokens[::n]), sum(len(c.token_ids) for c in choices)))
    return JSONResponse(body)


async def chat_completions(server: Server, request: Request):
    """POST /v1/chat/completions: messages rendered with the chat template; tools, reasoning, structured output."""
    req = await server.read(request, ChatCompletionRequest)
    server.check_model(req.model)
    tools = check_tools(req.tools, req.tool_choice)
    if tools and server.chat_style.tool_format is None:
        raise APIError(400, "tools requires a chat template that renders tools in a tool-call format rdnac "
                            "parses (Hermes/Qwen <tool_call>, Llama 3 JSON, Mistral [TOOL_CALLS], GPT-OSS "
                            "harmony); got a template with none; serve with --chat-template FILE", param="tools")
    forced = req.tool_choice if tools and req.tool_choice not in (None, "auto") else None
    if forced is not None:  # the output is constrained to the call by its schema
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise APIError(400, f"tool_choice {forced!r} requires no response_format (it sets its own); got "
                                f"both", param="response_format")
        req.response_format = forced_format(tools, forced)
    prompt_text, ids = await server.render_chat(req.template_messages(), tools, req.chat_template_kwargs or {})
    # OpenAI's chat default is "until the context is full"; the engine caps it at the model length.
    max_tokens = req.max_completion_tokens or req.max_tokens or server.max_model_len
    params = await server.params(req, max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    group = await server.start(request_id, [prompt_text], params, chat=True, token_ids=[ids])
    stop_ids = server.tokenizer.eos_token_ids | set(req.stop_token_ids or [])
    parsers = [server.chat_style.output(prompt_text, bool(tools), stop_ids, forced) for _ in group.ids]

    def wrap(choices, **extra):
        return envelope(request_id, "chat.completion.chunk" if req.stream else "chat.completion",
                        server.model_name, created, choices, **extra)

    def logprobs_of(token_ids, logprobs, top):
        return chat_logprobs(server.token_strings(token_ids), logprobs, server.top_strings(top)) \
            if req.logprobs else None

    def reason_of(reason: str | None, has_calls: bool) -> str | None:
        return "tool_calls" if has_calls and reason is not None else reason

    if req.stream:
        has_role = [False] * len(group.ids)

        def chunk(index, out, new_logprobs, new_top, choice):
            parser = parsers[index]
            delta, has_calls = parser.delta(parser.text(choice.text, choice.token_ids), out.finished)
            if not has_role[index]:  # with the first token, not at admission: TTFT is measured on it
                has_role[index] = True
                delta = {"role": "assistant", "content": "", **delta}
            elif not (delta or out.finished or (new_logprobs and req.logprobs)):
                return None
            return {"index": index, "delta": delta,
                    "logprobs": logprobs_of(out.new_token_ids, new_logprobs, new_top),
                    "finish_reason": reason_of(finish_reason(out), has_calls)}
        return server.stream(group, [], chunk, wrap, req.include_usage, len(group.ids))

    choices = await server.collect(request, group, len(group.ids))
    body = []
    for i, (c, parser) in enumerate(zip(choices, parsers)):
        message, has_calls = parser.message(parser.text(c.text, c.token_ids))
        body.append({"index": i, "message": message, "logprobs": logprobs_of(c.token_ids, c.logprobs, c.top),
                     "finish_reason": reason_of(c.finish_reason, has_calls)})
    return JSONResponse(wrap(body, usage=usage(group.num_prompt_tokens[0], sum(len(c.token_ids) for c in choices))))
