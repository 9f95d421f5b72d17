"""Grammar masks on the device sampler: xgrammar's packed token bitmask, filled per step into a fixed buffer
(runtime/token_bitmask.py) and applied as one masked op before the draw (sampling.apply_token_bitmask).

References: xgrammar's own `apply_token_bitmask_inplace` for the mask, and each row sampled alone for a
batch that mixes a row with a grammar and rows without one (a row's token depends only on its logits, seed,
step and mask).
"""

from __future__ import annotations

import json

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.runtime.sampling import SamplingBatch, apply_token_bitmask, sample
from rdnac.runtime.token_bitmask import TokenBitmasks
from tests.support.checkpoints import make_checkpoint

xgr = pytest.importorskip("xgrammar")

VOCAB = ["{", "}", '"', ":", ",", " ", "a", "b", "1", "2", "true", "null", '"a"', '{"', '":', "[", "]", "x", "\n"]


def _matcher(vocab_size: int):
    """A JSON grammar's matcher over a small vocabulary (padded to vocab_size, as a model's often is)."""
    from rdnac.serve.structured import Guide

    info = xgr.TokenizerInfo(VOCAB, vocab_size=vocab_size)
    return Guide(xgr, xgr.GrammarCompiler(info).compile_builtin_json_grammar()).matcher()


def test_bitmask_masks_as_xgrammar_does():
    torch.manual_seed(0)
    for vocab in (1823, 32, 33, 95):  # irregular sizes: a partial last word
        bitmask = torch.randint(-(1 << 31), 1 << 31, (3, (vocab + 31) // 32), dtype=torch.int64).to(torch.int32)
        bitmask[1] = -1  # a row without a grammar: all ones
        logits = torch.randn(3, vocab)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask)
        masked = apply_token_bitmask(logits, bitmask)
        assert masked.shape == logits.shape and masked.dtype == logits.dtype
        assert torch.equal(masked, expected)
        assert torch.equal(masked[1], logits[1])


def test_fill_writes_each_matchers_row_and_ones_elsewhere():
    vocab = 40
    bitmasks = TokenBitmasks(vocab, "cpu")
    matcher = _matcher(vocab)
    mask = bitmasks.fill([None, matcher, None])
    assert mask.shape == (3, 2) and mask.dtype == torch.int32
    expected = xgr.allocate_token_bitmask(1, vocab)
    matcher._matcher.fill_next_token_bitmask(expected)
    assert torch.equal(mask[1], expected[0]) and (mask[[0, 2]] == -1).all()
    allowed = [VOCAB[t] for t in range(len(VOCAB)) if mask[1, t // 32] >> (t % 32) & 1]
    assert set(allowed) <= {"{", '{"', "[", '"', '"a"', "1", "2", "true", "null", " ", "\n"}, allowed
    assert bitmasks.fill([matcher] * 4).data_ptr() == mask.data_ptr()  # the bucket's (4) fixed buffer, reused


@pytest.mark.parametrize("extras", [{}, {"top_ks": [5, 5, 5], "needs_logprobs": True}])
def test_grammar_row_and_free_rows_sample_as_each_alone(extras):
    """One bitmask for the batch: the grammar's row draws what it draws alone, the free rows what they draw
    without any mask, seeded, over several steps of a real matcher (eager `sample`, plain and not)."""
    vocab = 70
    torch.manual_seed(1)
    matcher, bitmasks = _matcher(vocab), TokenBitmasks(vocab, "cpu")
    text = ""
    for step in range(12):
        logits = torch.randn(3, vocab) * 3

        def batch(rows, mask):
            def pick(values):
                return [values[r] for r in rows]
            extra = {k: pick(v) if isinstance(v, list) else v for k, v in extras.items()}
            return SamplingBatch(**{"top_ks": [0] * len(rows), **extra}, temperatures=pick([1.0, 0.0, 0.7]),
                                 top_ps=[1.0] * len(rows), min_ps=[0.0] * len(rows),
                                 repetition_penalties=[1.0] * len(rows), token_ids=[[]] * len(rows),
                                 seeds=pick([11, 22, 33]), steps=[step] * len(rows), token_bitmask=mask)

        together, logprobs = sample(logits, batch([0, 1, 2], bitmasks.fill([None, matcher, None])))
        free, _ = sample(logits[[0, 2]], batch([0, 2], None))
        alone, alone_logprobs = sample(logits[1:2], batch([1], bitmasks.fill([matcher])))
        assert together.tolist() == [free[0].item(), alone[0].item(), free[1].item()]
        if logprobs is not None:
            assert torch.equal(logprobs[1:2], alone_logprobs)
        token = together[1].item()
        assert token < len(VOCAB), token  # the grammar never allows the padding ids
        matcher.accept(token)
        text += VOCAB[token]
    assert text.lstrip()[0] in '{["1tn2', text


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token_bitmask")
    make_checkpoint("llama", tmp / "ckpt")
    return rdnac.load(rdnac.compile(tmp / "ckpt", target="cpu", output=tmp / "tiny.msgpack", quiet=True))


def test_engine_batch_with_and_without_grammar_gives_each_alones_tokens(llm):
    """Through the LLMEngine (its TokenBitmasks and the runner's sampler): a JSON-schema request and a free
    one in the same batch each give the tokens they give alone, seeded at temperature 1."""
    from rdnac.serve.structured import GuideCompiler

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    guide = GuideCompiler(llm.tokenizer, llm.runner.vocab_size).guide(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    constrained = SamplingParams(max_tokens=30, temperature=1.0, seed=5, guide=guide)
    free = SamplingParams(max_tokens=30, temperature=1.0, seed=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    together = llm.generate(prompts, [constrained, free])
    alone = [llm.generate([prompts[0]], constrained)[0], llm.generate([prompts[1]], free)[0]]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert json.loads(together[0].text)["n"] is not None and together[0].finish_reason == "stop"
    assert len(together[1].token_ids) == 30
