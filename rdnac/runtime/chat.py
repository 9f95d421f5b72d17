"""Chat templates rendered with jinja2 the way transformers' `apply_chat_template` does.

Same environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols), same
helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII),
same variables (messages, tools, documents, add_generation_prompt and the
special tokens), so a plan renders prompts byte-for-byte like the reference.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rdnac.errors import RequestError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def token_string(value) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def render_chat(template: str | None, messages: list[dict], special_tokens: dict[str, str | None],
                add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs) -> str:
    """`kwargs`: the template's extra variables (transformers' chat template kwargs, e.g. enable_thinking)."""
    if not template:
        raise RequestError("chat requires a chat template; this plan's checkpoint has none; "
                           "use a plain prompt (--prompt) instead")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"chat messages require 'role' and 'content'; got {m!r}")
    try:
        variables = {**special_tokens, **kwargs}  # as transformers: the caller's kwargs over the special tokens
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise RequestError(f"chat template: {e}") from None
