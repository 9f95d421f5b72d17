"""SamplingParams: what one request asks of the sampler and the stop conditions (vLLM's names).

Defaults that a request leaves unset come from the plan's generation_config
(`from_generation_config`), the same way for `rdnac run`, the Python API and
`rdnac serve`; greedy where the config asks for no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rdnac.errors import RequestError

# generation_config keys that set sampling defaults (HF names, which are also ours)
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# The sampler keys its Philox draws with a seed's 64 bits (sampling.seed_to_int64): any signed or unsigned
# 64-bit integer is a seed; a wider one would silently alias another, so it is refused.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # x == x: not NaN


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random seed, drawn when the request is added
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the most likely tokens at each step, up to MAX_TOP_LOGPROBS
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence of a token already generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS, stop tokens and stop strings end nothing before this many tokens
    # a grammar (e.g. rdnac.serve.structured.Guide): `guide.matcher()` per sequence, whose `fill_bitmask(bitmask,
    # row)` writes its row of each step's token bitmask (token_bitmask.py) and `accept(token)` advances it
    guide: object | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", is_number(self.temperature) and 0 <= self.temperature < float("inf"),
             "a finite number >= 0"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", is_number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1: off)"),
            ("seed", self.seed is None or is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX,
             "None or an integer in [-2**63, 2**64 - 1] (64 bits)"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list)
             and all(is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
            ("logprobs", isinstance(self.logprobs, bool), "a bool"),
            ("top_logprobs", is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS
             and (self.logprobs or not self.top_logprobs), f"an integer in 0..{MAX_TOP_LOGPROBS}, with logprobs=True"),
            ("presence_penalty", is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2] (0: off)"),
            ("frequency_penalty", is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2] (0: off)"),
            ("logit_bias", isinstance(self.logit_bias, dict) and all(
                is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "a dict of token id >= 0 -> bias in [-100, 100]"),
            ("min_tokens", is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             "an integer in 0..max_tokens"),
            ("guide", self.guide is None or hasattr(self.guide, "matcher"), "None or a guide with matcher()"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise RequestError(f"{name} requires {requirement}; got {_shown(getattr(self, name))}")

    @classmethod
    def from_generation_config(cls, generation_config: dict | None, **overrides) -> SamplingParams:
        """Params whose unset fields (None or absent in `overrides`) take the plan's generation_config."""
        values = generation_defaults(generation_config or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _shown(value) -> str:
    if is_int(value) and value.bit_length() > 128:  # repr of a huge int is long, or raises past 4300 digits
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def generation_defaults(generation_config: dict) -> dict:
    """The sampling defaults a generation_config sets, by HF's rules: `do_sample: false` is greedy whatever
    else it says; without do_sample or temperature the default stays greedy."""
    gen = generation_config
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}
    if "temperature" not in out:
        out["temperature"] = 1.0 if gen.get("do_sample") is True else 0.0
    if out["temperature"] == 0:  # greedy: the truncation knobs would only be checked, never used
        out = {"temperature": 0.0, **({"repetition_penalty": out["repetition_penalty"]}
                                      if "repetition_penalty" in out else {})}
    if "top_k" in out:
        out["top_k"] = max(0, int(out["top_k"]))  # HF's "off" can be written as a negative
    return out
