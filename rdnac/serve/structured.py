"""Structured output for `rdnac serve`: `response_format` json_object / json_schema (and vLLM's
`structured_outputs` regex / grammar extension) as a grammar that masks the logits before the runtime's
sampler.

The grammar engine is xgrammar (the `structured` extra: `pip install 'rdnac[structured]'`). A `Guide`
compiles one request's grammar; the LLMEngine asks it for a matcher per sequence (so `n` choices each
follow the grammar on their own). Each step every matcher writes its row of the batch's token bitmask
(xgrammar's packed layout, in a fixed host buffer: runtime/token_bitmask.py), which the sampler applies on
the device as one masked op (`sampling.apply_token_bitmask`); the engine then feeds each drawn token back.
The only host work per token is xgrammar's own: filling the bitmask row and advancing the matcher.
"""

from __future__ import annotations

import json

import torch

from rdnac.serve.protocol import APIError


def _xgrammar(param: str):
    try:
        import xgrammar
    except ImportError:
        raise APIError(400, f"{param} requires the grammar library xgrammar on the server; got none installed; "
                            f"install it with: pip install 'rdnac[structured]'", param=param) from None
    return xgrammar


class _Matcher:
    """One sequence's place in the grammar."""

    def __init__(self, xgr, compiled):
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next (only the stop tokens once it is complete) into row `row`
        of a [B, ceil(V / 32)] int32 host bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self._matcher.is_terminated():  # a stop token ends the grammar; an ignored EOS keeps going
            self._matcher.accept_token(token)


class Guide:
    """A compiled grammar; `matcher()` starts one sequence on it (what SamplingParams.guide expects)."""

    def __init__(self, xgr, compiled):
        self._xgr, self._compiled = xgr, compiled

    def matcher(self) -> _Matcher:
        return _Matcher(self._xgr, self._compiled)


class GuideCompiler:
    """Compiles grammars for one tokenizer (its vocabulary is read once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiled = None

    def _compiler(self):
        if self._compiled is None:
            self._compiled = self._make_compiler()
        return self._compiled

    def _make_compiler(self):
        xgr = _xgrammar("response_format")
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                  stop_token_ids=sorted(self.tokenizer.eos_token_ids))
        return xgr, xgr.GrammarCompiler(info)

    def guide(self, response_format: dict | None, param: str = "response_format") -> Guide | None:
        """The guide a request's response_format asks for; None for text. A 400 naming the field otherwise."""
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind not in ("json_object", "json_schema", "regex", "grammar"):
            raise APIError(400, f"{param}.type requires one of text, json_object, json_schema, regex, grammar; "
                                f"got {kind!r}", param=f"{param}.type")
        _xgrammar(param)
        if not self.tokenizer.has_tokenizer:
            raise APIError(400, f"{param} requires a plan with a tokenizer; this plan has none", param=param)
        xgr, compiler = self._compiler()
        try:
            if kind == "json_object":  # OpenAI's: a JSON object (xgrammar's builtin grammar takes any value)
                return Guide(xgr, compiler.compile_json_schema('{"type": "object"}', any_whitespace=False))
            if kind == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise APIError(400, f"{param}.json_schema.schema requires a JSON schema object; got "
                                        f"{type(schema).__name__}", param=f"{param}.json_schema.schema")
                _check_schema(schema, f"{param}.json_schema.schema")
                # no free whitespace: a sampled model could otherwise fill max_tokens with it
                return Guide(xgr, compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
            pattern = response_format.get(kind)
            if not isinstance(pattern, str) or not pattern:
                raise APIError(400, f"{param}.{kind} requires a non-empty string; got {pattern!r}",
                               param=f"{param}.{kind}")
            compiled = compiler.compile_regex(pattern) if kind == "regex" else compiler.compile_grammar(pattern)
            return Guide(xgr, compiled)
        except RuntimeError as e:  # xgrammar's word on a schema, regex or grammar it cannot compile
            where = {"json_schema": "json_schema.schema"}.get(kind, kind)
            raise APIError(400, f"{param}.{where} requires a valid {kind.replace('_', ' ')}; got one xgrammar "
                                f"refuses: {_one_line(e)}", param=f"{param}.{where}") from None


def _check_schema(schema, param: str) -> None:
    """A schema that is not valid JSON Schema is refused even where xgrammar would accept it."""
    try:
        import jsonschema
    except ImportError:
        return  # xgrammar still refuses what it cannot compile
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"{param} requires a valid JSON schema; got one that is not: {_one_line(e.message)}",
                       param=param) from None


def _one_line(e) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[-1] if text.startswith("[") else text
