"""`pytest --shard K/N` (tests/conftest.py): the N slices partition what the other options select."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_errors.py", *args], cwd=ROOT, capture_output=True, text=True)
    return out.returncode, sorted(line for line in out.stdout.splitlines() if "::" in line)


def test_shards_partition_the_selection():
    _, everything = _collected()
    slices = [_collected("--shard", f"{k}/3")[1] for k in (1, 2, 3)]
    assert len(everything) >= 6 and all(slices)
    assert sorted(sum(slices, [])) == everything  # every test once: no overlap, none lost
    _, selected = _collected("-k", "plan or tensor")
    halves = [_collected("-k", "plan or tensor", "--shard", f"{k}/2")[1] for k in (1, 2)]
    assert 2 <= len(selected) < len(everything)
    assert sorted(sum(halves, [])) == selected  # slices of what -k kept, not of everything


def test_bad_shard_is_a_usage_error():
    code, _ = _collected("--shard", "3/2")
    assert code == 4  # pytest's usage-error exit status
