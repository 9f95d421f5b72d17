"""The plan cache of `rdnac serve MODEL`: compile on first use, reuse after.

A plan lives under `$XDG_CACHE_HOME/rdnac/plans` (default
`~/.cache/rdnac/plans`), named by a key over everything that changes it: the
checkpoint (a model id's commit sha; a local path's resolved path and the
xxh3 hash of its files' contents), the target, the compile options, and the
rdnac, torch and (for GPU targets) Triton versions. A stale entry is never
reused: any of those changing gives another key. Writes are atomic
(`write_plan` renames complete files into place), so two servers starting
together at worst compile twice.

    plan, cached = cached_plan("Qwen/Qwen3-0.6B", "auto", {"max_model_len": 4096})
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import rdnac
from rdnac.errors import TargetError

log = logging.getLogger("rdnac.plan_cache")

KEY_VERSION = 1  # bump when what the key covers changes


def plan_cache_dir() -> Path:
    from rdnac.targets.probe import user_cache_dir

    return user_cache_dir() / "plans"


def resolve_target(target: str) -> str:
    """`auto`: the local GPU's target (by its arch, as `rdnac.runtime.aot` reads it), else cpu."""
    if target != "auto":
        return target
    import torch

    if not torch.cuda.is_available():
        log.info("--target auto: no GPU visible to torch; compiling for cpu")
        return "cpu"
    from rdnac.runtime.aot import device_arch
    from rdnac.targets import TARGETS

    arch, gpu = device_arch(0)
    if arch not in TARGETS:
        raise TargetError(f"--target auto requires a GPU rdnac has a target for; got {gpu} ({arch}); known: "
                          f"{', '.join(TARGETS)}; pass --target explicitly")
    log.info("--target auto: %s (%s)", arch, gpu)
    return arch


def checkpoint_key(model: str) -> dict:
    """What identifies MODEL's contents: a model id's commit, else the files' path and content hash."""
    from rdnac.compiler.model_ids import parse_model_id, resolve

    if model.startswith("demo:"):
        from rdnac.compiler.frontend.demo_models import resolve_demo

        path = resolve_demo(model)
    else:
        model_id = parse_model_id(model)
        if model_id is not None:
            resolved = resolve(model_id)
            return {"model_id": str(model_id), "commit": resolved.commit, "file": resolved.path.name}
        path = Path(model)
    return {"path": str(Path(path).resolve()), "content_xxh3": content_hash(Path(path))}


def content_hash(path: Path) -> str:
    """xxh3-64 over a file, or over a directory's files (names and bytes, sorted; hidden files skipped)."""
    import xxhash

    h = xxhash.xxh3_64()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and
                                                   not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def plan_key(model: str, target: str, options: dict) -> tuple[str, dict]:
    """(key, what it covers) of MODEL compiled for `target` (a real target, not auto) with `options`."""
    import torch

    covers = {"key_version": KEY_VERSION, "checkpoint": checkpoint_key(model), "target": target,
              "options": {k: options[k] for k in sorted(options)}, "rdnac_version": rdnac.__version__,
              "torch_version": torch.__version__}
    if target != "cpu":
        import triton

        covers["triton_version"] = triton.__version__
    digest = hashlib.sha256(json.dumps(covers, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, covers


def _with_defaults(options: dict) -> dict:
    """The compile options with every unset one at its default, so that asking for a default and leaving it
    out give one key (and a changed default gives another)."""
    from dataclasses import MISSING, fields

    from rdnac.compiler.pipeline import CompileOptions

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(CompileOptions)
                if f.name not in ("target", "quiet", "verify_each_pass")}
    return {**defaults, **options}


def cached_plan(model: str, target: str, options: dict | None = None, *, quiet: bool = True) -> tuple[Path, bool]:
    """(plan path, whether it was in the cache): MODEL's plan for `target` (or auto), compiled on a miss."""
    options = _with_defaults({k: v for k, v in (options or {}).items() if v is not None})
    target = resolve_target(target)
    key, covers = plan_key(model, target, options)
    stem = str(model).removeprefix("demo:").rstrip("/").split("/")[-1].removesuffix(".gguf")
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem.split("@")[0].split(":")[0])
    path = plan_cache_dir() / f"{stem}.{target}.{key}.msgpack"
    from rdnac.plans.format import weights_path_for

    if path.exists() and weights_path_for(path).exists():
        log.info("plan cache hit: %s", path)
        return path, True
    from rdnac.compiler.pipeline import compile_model

    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("plan cache miss: compiling %s for %s into %s", model, target, path)
    compile_model(model, target, path, quiet=quiet, **{k: v for k, v in options.items() if v is not None})
    path.with_name(path.name.removesuffix(".msgpack") + ".key.json").write_text(json.dumps(covers, indent=2, sort_keys=True, default=str))
    return path, False
