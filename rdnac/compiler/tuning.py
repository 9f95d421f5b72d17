"""Measured kernel configs: search on a GPU, store per target, pick up at compile time.

The cost model ranks configs without a GPU; a tuning table replaces its guess
with a measurement where one exists. The search (`rdnac.compiler.tune`,
`rdnac tune PLAN`, `python -m rdnac.bench.tune_shapes`) runs on a machine with the target
GPU and times every candidate built through the same AOT path plans use.
The winners go to `rdnac/compiler/tuned/<target>.json` (shipped) or the
user's `~/.cache/rdnac/tuned/<target>.json` (which wins on conflicts).

Entries are keyed by family and problem: the fields its kernel-registry
record names (`KernelFamily.tuning_key`: the GEMM's N, K, dtype and FP8
scheme; attention's phase, heads, head size and KV block size) and its size
(`KernelFamily.size`: GEMM rows; the sequences of a decode step or the tokens
of a prefill step for attention) as "M". A lookup for an M bucket that was not measured takes the
nearest measured bucket of the same tile regime (decode M <= 16, M <= 64,
M <= 256, prefill), because configs only change between regimes.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from rdnac.errors import RdnacError
from rdnac.kernels import registry
from rdnac.targets.probe import user_cache_dir

SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"
_REGIMES = ((1, 16), (17, 64), (65, 256), (257, 1 << 30))


def measured_form(problem: dict) -> dict:
    """The problem as a measurement stands for it: a prequantized FP8 GEMM is the GEMM of the dynamic
    scheme its fused producer replaced (the same kernel, minus the quant launch)."""
    if problem.get("act_scheme") != "prequantized":
        return problem
    return dict(problem, act_scheme="dynamic_group" if problem.get("group") else "dynamic_token")


def tuned_families() -> tuple[str, ...]:
    """The kernel families `rdnac tune` measures: those whose registry record has a tuning key."""
    return tuple(name for name, fam in registry.families().items() if fam.tuning_key)


def problem_key(family: str, problem: dict) -> str:
    problem = measured_form(problem)
    return family + "|" + "|".join(f"{f}={problem.get(f)}" for f in registry.family(family).tuning_key)


def problem_m(family: str, problem: dict) -> int:
    """The size a config depends on (the record's `size`): GEMM rows; attention's sequences or tokens."""
    return registry.family(family).size(problem)


def _regime(m: int) -> tuple[int, int]:
    return next(r for r in _REGIMES if r[0] <= m <= r[1])


def table_paths(target: str) -> list[Path]:
    """The tables read for `target`, lowest priority first."""
    return [SHIPPED_DIR / f"{target}.json", user_cache_dir() / "tuned" / f"{target}.json"]


@lru_cache(maxsize=None)
def load(target: str) -> dict[str, dict]:
    """{problem_key: {M bucket (int): entry}} merged over the tables of `target`."""
    merged: dict[str, dict] = {}
    for path in table_paths(target):
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RdnacError(f"{path}: tuning table is not valid JSON ({e}); delete or fix it") from e
        for entry in doc.get("entries", []):
            entry = dict(entry, device=entry.get("device", doc.get("device")), table=str(path))
            merged.setdefault(entry["key"], {})[int(entry["M"])] = entry
    return merged


def lookup(target: str, family: str, problem: dict) -> dict | None:
    """The measured entry for this problem, or the nearest measured M bucket of the same regime."""
    if family not in tuned_families():
        return None
    by_m = load(target).get(problem_key(family, problem))
    if not by_m:
        return None
    m = problem_m(family, problem)
    lo, hi = _regime(m)
    same = [mm for mm in by_m if lo <= mm <= hi]
    if not same:
        return None
    return by_m[min(same, key=lambda mm: abs(math.log2(mm) - math.log2(max(m, 1))))]


# Sizes where a measured tile carries over to other shapes of the same kind: compute-bound GEMMs,
# whose sm90 winners are one tile per kind on every measured shape (bf16: 128x128x64, 8 warps, 3-4
# stages, where the cost model's pick measured ~2x slower; FP8 block 128x128x128; FP8 per-channel was
# 128x256x128 until its kernel promoted the wgmma accumulator, which made that tile spill on sm90: those
# entries were dropped, 2026-12-06, and wait for a re-tune). Decode winners depend on N and K (split-K,
# tile widths) and do not carry over.
SHAPE_FREE_MIN_M = _REGIMES[-1][0]


def nearest_shape(target: str, family: str, problem: dict) -> dict | None:
    """For a GEMM problem the table lacks, at compute-bound sizes: the entry of the measured shape
    nearest in (log N, log K) with the same key fields otherwise (dtype, scheme, act) and the same
    regime, or None."""
    if not family.startswith("gemm") or problem_m(family, problem) < SHAPE_FREE_MIN_M:
        return None
    form = measured_form(problem)
    same_kind = [f for f in registry.family(family).tuning_key if f not in ("N", "K")]
    best, best_distance = None, math.inf
    for by_m in load(target).values():
        for m, entry in by_m.items():
            p = entry["problem"]
            if (entry["family"] != family or m < SHAPE_FREE_MIN_M
                    or any(p.get(f) != form.get(f) for f in same_kind)):
                continue
            distance = abs(math.log2(p["N"] / form["N"])) + abs(math.log2(p["K"] / form["K"]))
            if distance < best_distance:
                best, best_distance = entry, distance
    return best


def describe_nearest(entry: dict, problem: dict) -> str:
    p = entry["problem"]
    return (f"not measured at N={problem['N']} K={problem['K']}: the config measured fastest for the nearest "
            f"measured shape N={p['N']} K={p['K']} ({entry['us']:.1f} us at M={entry['M']} on {entry.get('device')}, "
            f"tuning table {Path(entry['table']).name}); compute-bound tiles carry over between shapes")


def describe(entry: dict, problem: dict | None = None) -> str:
    """Why a measured config was chosen (`problem` unused: the signature of describe_nearest)."""
    return (f"measured fastest of {entry['candidates']} candidates on {entry.get('device')}: "
            f"{entry['us']:.1f} us at M={entry['M']} (tuning table {Path(entry['table']).name})")


def save(path: Path, device: str, versions: dict, entries: list[dict]) -> None:
    """Merge `entries` into the table at `path` (same key and M replaced). Every entry carries the
    device and versions it was measured with: one table may hold measurements from several GPUs of
    the target (an H100 and an H200 are both sm90); the document's own stamp is the latest run's."""
    doc = json.loads(path.read_text()) if path.exists() else {"entries": []}
    fresh = {(e["key"], e["M"]) for e in entries}
    kept = [dict(e, device=e.get("device", doc.get("device")), versions=e.get("versions", doc.get("versions")))
            for e in doc["entries"] if (e["key"], e["M"]) not in fresh]
    entries = [dict(e, device=device, versions=versions) for e in entries]
    doc.update(device=device, versions=versions,
               entries=sorted(kept + entries, key=lambda e: (e["key"], e["M"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    load.cache_clear()
