"""Issue 22's acceptance on cpu: one seeded request (temperature 0.8) gives identical tokens through the
Python API, `rdnac run` and `rdnac serve`, alone and inside a batch of 17 other requests."""

from __future__ import annotations

import fastapi  # noqa: F401  (installed by make: rdnac[serve])

import rdnac
from tests.support.checkpoints import make_checkpoint
from tests.support.same_tokens import check_same_tokens


def test_seed_gives_the_same_tokens_everywhere(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    plan = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "llama.msgpack", quiet=True)
    tokens = check_same_tokens(rdnac.load(plan), plan)
    assert len(tokens) > 1
