"""OpenAI request and response bodies for `rdnac serve`.

Requests are validated with pydantic and mapped onto the runtime's
SamplingParams; whatever rdnac cannot honour (best_of, suffix, a forced
tool_choice, any field it does not know) is refused with a 400 naming the
field, never silently ignored. Only fields that change nothing about the
answer (user, metadata, ...: `IGNORED_FIELDS`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from rdnac.runtime.llm_engine import RequestOutput
from rdnac.runtime.sampling_params import SamplingParams

# OpenAI's range for `seed` (a signed 64-bit integer); the sampler takes any 64 bits
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
# fields OpenAI clients send that change nothing about the answer; any other unknown field is refused
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class APIError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to be refused by name in check_supported

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (prompt logprobs, nothing generated)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0 both mean "off" (vLLM uses -1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)
    response_format: dict | None = None  # text, json_object, json_schema; vLLM's regex and grammar too

    def check_supported(self) -> None:
        unknown = sorted(set(self.model_extra or {}) - IGNORED_FIELDS)
        if unknown:
            raise APIError(400, f"{unknown[0]} is not supported by rdnac serve; got {unknown[0]}="
                                f"{_short(self.model_extra[unknown[0]])}; remove it", param=unknown[0])
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise APIError(400, f"seed requires an integer in [-2**63, 2**63 - 1] (OpenAI's range); got "
                                f"{_short(self.seed)}", param="seed")
        if self.n < 1:
            raise APIError(400, f"n requires an integer >= 1; got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options requires stream=true", param="stream_options")

    def token_biases(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with its keys (token ids as strings, OpenAI's form) checked against the vocabulary."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size or not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias requires token ids in 0..{vocab_size - 1} mapped to a bias in "
                                    f"[-100, 100]; got {_short(key)}: {_short(bias)}", param="logit_bias")
            biases[int(key)] = bias
        return biases

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[StrictInt] | list[str | list[StrictInt]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens requires an integer >= 1 (0 only with echo=true, for prompt logprobs); "
                                "got 0", param="max_tokens")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of requires 1; got {self.best_of}", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per choice: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt requires a string, a token list, or a non-empty list of them; got []",
                           param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, as the template renders them
    tool_call_id: str | None = None  # a tool result's
    reasoning_content: str | None = None

    def to_template(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{index}].content: only text parts are supported; got type "
                                        f"{part.type!r}", param=f"messages.{index}.content")
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, f"top_logprobs requires logprobs=true; got top_logprobs={self.top_logprobs} without "
                                f"it", param="top_logprobs")
        if self.max_tokens == 0:
            raise APIError(400, "max_tokens requires an integer >= 1; got 0", param="max_tokens")

    def template_messages(self) -> list[dict]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]


def parse_request(cls: type[BaseModel], body: Any):
    """Validate a decoded JSON body; a validation failure is a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body requires a JSON object; got {type(body).__name__}")
    try:
        request = cls.model_validate(body)
    except ValidationError as e:
        message, param = _describe(e.errors())
        raise APIError(400, message, param=param) from None
    request.check_supported()
    return request


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors; a union reports one error per alternative, merged here."""
    # loc parts that name a union alternative ("str", "list[int]") are not fields
    path = [str(p) for p in errors[0]["loc"] if isinstance(p, int) or p.isidentifier() and p not in _TYPE_TAGS]
    param = ".".join(path) or None
    related = [err["msg"] for err in errors if err["loc"][:1] == errors[0]["loc"][:1]]
    message = " or ".join(dict.fromkeys(related))
    return (f"{param}: {message}" if param else message), param


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sampling_params(req: _SamplingRequest, generation_config: dict, max_tokens: int,
                    logprobs: bool, top_logprobs: int = 0, **extra) -> SamplingParams:
    """Map a request onto SamplingParams; unset fields take the plan's generation_config as `rdnac run` does
    (`SamplingParams.from_generation_config`: greedy where the config asks for no sampling or says nothing)."""
    top_k = None if req.top_k is None else max(0, req.top_k)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams.from_generation_config(
        generation_config, max_tokens=max_tokens, temperature=req.temperature, top_k=top_k, top_p=req.top_p,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=extra.pop("seed", req.seed), stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        top_logprobs=top_logprobs, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        min_tokens=req.min_tokens, **extra)


# ---------------------------------------------------------------- responses

def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def envelope(request_id: str, obj: str, model: str, created: int, choices: list[dict], **extra) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of n: the request's for the first, then distinct 64-bit mixes of it (a
    SplitMix64 step), so n choices differ and the same request seed gives the same n again."""
    if seed is None or index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & (1 << 64) - 1
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & (1 << 64) - 1
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & (1 << 64) - 1
    return z ^ (z >> 31)


def completion_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None,
                        text_offset: int = 0) -> dict:
    """The legacy completions logprobs object; top_logprobs: per token, {token: logprob} of the most likely
    (null when logprobs=0)."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    top_logprobs = [dict(alts) if alts is not None else None for alts in top] if top is not None else None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(*alt) for alt in alts]}
                        for t, lp, alts in zip(tokens, logprobs, top or [[]] * len(tokens))]}


def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None
