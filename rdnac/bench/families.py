"""Harness shapes of the MoE, hybrid Gated DeltaNet and MLA families (issues 24, 25, 26), end to end.

    rdnac bench --shape gpt-oss-20b --peers --out results/      # GPU: MXFP4 and bf16 of one model, one run
    rdnac bench --shape deepseek-v2-lite --peers --tiny         # the same code path on the cpu, tiny widths

Per shape and scheme, in one process: a random checkpoint of the model's real
widths with fewer layers (`rdnac.testing.moe` for Qwen3-MoE and GPT-OSS,
`rdnac.testing.families` for Qwen3.5 and DeepSeek), its plan (compiled in a
subprocess), decode TPOT at the family's batches and contexts with achieved
bandwidth of the bytes the step reads (`decode.decode_bytes_by_layer`: the
active experts expected at that batch, attention KV, MLA's latent cache, GDN
state read and written), prefill tokens/s, and transformers eager on the same
checkpoint (`peers.measure_transformers_family`) with the same byte count.

Fewer layers, honestly scaled: every record names `layers` and the model's
`full_layers`; decode records add the bytes a full-depth step would read
(each measured layer standing for the model's layers of its kind: GDN or
full attention, dense or MoE, sliding or full window) and the TPOT that
would take at the bandwidth this plan achieved (`full_depth_tpot_ms_est`, an
estimate, not a measurement); prefill records add ms per layer. `--profile`
adds the per-op kernel breakdown of a batch-1 decode step (at the last
context) and of the largest prefill (the GDN kernels' share of it). `--tiny` runs
each shape's tiny variant on the cpu target in seconds: the code path of the
GPU run, with the family's batches, a 64th of its contexts and small prefills.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path

import torch

_PERIOD = ["linear_attention"] * 3 + ["full_attention"]


def _same(i: int, n: int) -> str:
    return "moe"


def _alternating(i: int, n: int) -> str:  # GPT-OSS: sliding window on even layers
    return "sliding" if i % 2 == 0 else "full"


def _hybrid(i: int, n: int) -> str:
    return _PERIOD[i % 4]


def _dense_first(first_k: int):
    def kind(i: int, n: int) -> str:  # as rdnac.testing.families.hf_config cuts first_k_dense_replace
        return "dense" if i < min(first_k, n - 1) else "moe"
    return kind


@dataclasses.dataclass(frozen=True)
class Family:
    writer: str  # "moe" (rdnac.testing.moe) or "hf" (rdnac.testing.families)
    source: str  # the writer's shape name
    tiny: str  # the writer's tiny variant
    schemes: tuple[str, ...]  # measured in this order, in one run
    layers: int  # decoder layers of the benchmarked plan
    full_layers: int  # the model's
    kind: object  # (layer, layers) -> its kind, for the full-depth scaling
    batch: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill: tuple[int, ...]
    minutes: float  # expected wall time of one run with --peers on an H100 (cold machine), all schemes
    peers: bool = True  # False: transformers is not run (the issue asks for rdnac only)
    tiny_layers: int = 4


FAMILIES = {
    "qwen3-30b-a3b": Family("moe", "qwen3-30b-a3b", "qwen3-moe-tiny", ("bf16",), 6, 48, _same,
                            (1, 16, 64), (256,), (2048,), 4),
    "gpt-oss-20b": Family("moe", "gpt-oss-20b", "gpt-oss-tiny", ("mxfp4", "bf16"), 4, 24, _alternating,
                          (1, 16, 64), (256,), (2048,), 6),
    "qwen3.5-9b": Family("hf", "qwen3.5-9b", "qwen3.5-tiny", ("bf16",), 4, 32, _hybrid,
                         (1, 8, 32), (256,), (2048, 16384), 4),
    "qwen3.5-27b": Family("hf", "qwen3.5-27b", "qwen3.5-tiny", ("bf16",), 4, 64, _hybrid,
                          (1, 8, 32), (256,), (2048, 16384), 4.5),
    "qwen3.5-35b-a3b": Family("hf", "qwen3.5-35b-a3b", "qwen3.5-moe-tiny", ("bf16",), 4, 40, _hybrid,
                              (1, 8, 16, 32), (256,), (2048, 16384), 4.5),
    "deepseek-v2-lite": Family("hf", "deepseek-v2-lite", "deepseek-v2-tiny", ("bf16",), 4, 27, _dense_first(1),
                               (1, 16, 64), (256, 8192), (2048,), 5, tiny_layers=3),
    "deepseek-v3": Family("hf", "deepseek-v3", "deepseek-v3-tiny", ("fp8-block",), 2, 61, _dense_first(3),
                          (1, 64), (256,), (), 8, peers=False, tiny_layers=2),
}
TINY_CONTEXT_DIVISOR = 64


def layer_factors(family: Family, layers: int) -> list[float]:
    """How many of the model's layers each measured layer stands for: the model's count of its kind over
    the plan's count of it."""
    kinds = [family.kind(i, layers) for i in range(layers)]
    full = [family.kind(i, family.full_layers) for i in range(family.full_layers)]
    return [full.count(k) / kinds.count(k) for k in kinds]


def write_checkpoint(root: Path, shape: str, scheme: str, layers: int, tiny: bool) -> tuple[Path, float | None]:
    """The random checkpoint under `root`, and the seconds writing it took, or None where `root` already held
    one written the same way (a stamp beside it names shape, scheme, layers and the generators' source)."""
    from rdnac.testing import deepseek, families, fp8, moe

    family = FAMILIES[shape]
    source = family.tiny if tiny else family.source
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / f"{source}-{layers}l-{scheme}"
    stamp_path = ckpt.with_name(ckpt.name + ".stamp.json")
    code = "".join(inspect.getsource(m) for m in (families, moe, fp8, deepseek))
    stamp = {"source": source, "scheme": scheme, "layers": layers, "seed": 0,
             "generator_sha256": hashlib.sha256(code.encode()).hexdigest()}
    if ckpt.is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return ckpt, None
    stamp_path.unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    started = time.perf_counter()
    if family.writer == "moe":
        device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
        moe.write_random_moe_checkpoint(ckpt, source, scheme, layers=layers, device=device)
    else:
        families.write_random_family_checkpoint(ckpt, source, layers=layers, scheme=scheme)
    stamp_path.write_text(json.dumps(stamp))
    return ckpt, time.perf_counter() - started


def plan_sizes(cfg, family: Family, tiny: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batches, contexts, prefill sizes): the ones given on the command line, else the family's."""
    batch = cfg.batch if "batch" in cfg.given else family.batch
    contexts = (cfg.context,) if "context" in cfg.given else family.contexts
    prefill = cfg.prefill if "prefill" in cfg.given else family.prefill
    if tiny:
        contexts = tuple(max(8, c // TINY_CONTEXT_DIVISOR) for c in contexts)
        prefill = tuple(max(16, p // TINY_CONTEXT_DIVISOR) for p in prefill)
    return batch, contexts, prefill


def measure_family(shape: str, work: Path, cfg, emit) -> None:
    """Every scheme of `shape` (or those of cfg.schemes it has), one after another in this process."""
    family = FAMILIES[shape]
    schemes = [s for s in family.schemes if "schemes" not in cfg.given or s in cfg.schemes]
    if not schemes:
        emit({"shape": shape, "skipped": f"requires a scheme of {', '.join(family.schemes)}; "
                                         f"got {', '.join(cfg.schemes)}"})
        return
    if not cfg.tiny:
        emit({"shape": shape, "expected_minutes_on_h100": family.minutes, "schemes": schemes})
    batch1 = {}
    for scheme in schemes:
        batch1[scheme] = measure_scheme(shape, scheme, work, cfg, emit)
    if "mxfp4" in batch1 and "bf16" in batch1 and None not in batch1.values():
        (m, m_full), (b, b_full) = batch1["mxfp4"], batch1["bf16"]
        emit({"shape": shape, "mxfp4_over_bf16_tpot_batch1": round(m / b, 3),
              "mxfp4_over_bf16_tpot_batch1_full_depth_est": round(m_full / b_full, 3)})


def measure_scheme(shape: str, scheme: str, work: Path, cfg, emit) -> tuple[float, float] | None:
    """Checkpoint, compile, decode and prefill records, then the transformers peer; returns the batch-1 TPOT
    at the first context (measured, and estimated at full depth) for the MXFP4/bf16 ratio."""
    import rdnac
    from rdnac.bench.decode import copy_bandwidth, decode_bytes, decode_bytes_by_layer, decode_record
    from rdnac.bench.harness import rdnac_cmd, subprocess_env, timed_subprocess
    from rdnac.bench.prefill import prefill_record

    family = FAMILIES[shape]
    tiny = cfg.tiny
    device, target = ("cpu", "cpu") if tiny else ("cuda", "sm90")
    layers = cfg.layers or (family.tiny_layers if tiny else family.layers)
    batches, contexts, prefill = plan_sizes(cfg, family, tiny)
    label = {"shape": shape, "scheme": scheme}
    scale = {"layers": layers, "full_layers": family.full_layers, **({"tiny": True} if tiny else {})}
    ckpt, write_s = write_checkpoint(cfg.checkpoints or work, shape, scheme, layers, tiny)
    emit({**label, **scale, "checkpoint": str(ckpt),
          **({"checkpoint_reused": True} if write_s is None else {"checkpoint_write_s": round(write_s, 1)})})

    plan = work / f"{shape}-{scheme}.{target}.msgpack"
    max_len = max(max(prefill, default=0), max(contexts) + 2)
    max_len = -(-max_len // 256) * 256
    compile_s, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", target, "-o", str(plan), "-q",
                                              "--max-model-len", str(max_len)), subprocess_env())
    emit({**label, "compile_s": round(compile_s, 1), "max_model_len": max_len})

    started = time.perf_counter()
    llm = rdnac.load(plan, device=device, max_num_seqs=max(batches),
                     max_num_batched_tokens=max(max(prefill, default=0), 2048 if not tiny else 64))
    emit({**label, "load_s": round(time.perf_counter() - started, 1)})
    bw = copy_bandwidth(device)
    factors = layer_factors(family, layers)
    steps = dict(steps=2, warmup=1) if tiny else {}
    first = None
    for context in contexts:
        for batch in batches:
            record = decode_record(llm, batch, context, bw, **steps)
            by_layer = decode_bytes_by_layer(llm, batch, context)
            full = by_layer.get(None, 0) + sum(f * by_layer.get(i, 0) for i, f in enumerate(factors))
            est = record["tpot_ms"] * full / sum(by_layer.values())
            emit({"engine": "rdnac", **label, **record, **scale, "full_depth_bytes_GB": round(full / 1e9, 3),
                  "full_depth_tpot_ms_est": round(est, 3)})
            if first is None and batch == 1:
                first = (record["tpot_ms"], est)
    for tokens in prefill:
        record = prefill_record(llm, tokens, repeats=1 if tiny else 3)
        emit({"engine": "rdnac", **label, **record, **scale,
              "prefill_ms_per_layer": round(record["prefill_ms"] / layers, 3)})
    if cfg.profile and not tiny:  # where the step's time goes: GDN's share of a prefill (issue 25), MLA's of decode
        from rdnac.bench.profile import kernel_breakdown

        rows, summary = kernel_breakdown(llm, contexts[-1], bw)
        emit({**label, "profile_summary": summary, "batch": 1, "context": contexts[-1]})
        emit.write_rows(f"profile-{shape}-{scheme}.json", rows)
        if prefill:
            rows, summary = kernel_breakdown(llm, max(prefill), bw, prefill=max(prefill))
            emit({**label, "prefill_profile_summary": summary, "prefill_tokens": max(prefill)})
            emit.write_rows(f"profile-prefill{max(prefill)}-{shape}-{scheme}.json", rows)
    read = {(b, c): decode_bytes(llm, b, c) for b in batches for c in contexts}
    del llm
    gc.collect()  # the plan's weights, state and graphs leave the device before transformers loads
    if device == "cuda":
        torch.cuda.empty_cache()
    if cfg.peers and family.peers:
        from rdnac.bench.peers import measure_transformers_family

        for record in measure_transformers_family(ckpt, list(batches), list(contexts), list(prefill),
                                                  lambda b, c: read[b, c], bw, device,
                                                  new_tokens=4 if tiny else 16):
            emit({**label, **record, **scale})
    elif cfg.peers:
        emit({**label, "engine": "transformers eager", "skipped": "not run for this shape (no peer asked for by "
                                                                  "its issue; FP8-block MoE at this size is slow)"})
    if not cfg.checkpoints:
        shutil.rmtree(ckpt)
    for path in work.glob(f"{shape}-{scheme}.{target}.*"):
        path.unlink()
    return first
