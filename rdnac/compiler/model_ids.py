"""Model ids: `ORG/NAME[@REVISION]` and `ORG/NAME[@REVISION]:QUANT` -> a local checkpoint path.

The step before the frontend readers (`frontend.read_checkpoint`): an id that
is not a local path resolves through the Hugging Face cache, offline first,
with `huggingface_hub`. The cache is read in its own layout
(`models--ORG--NAME/refs/REVISION`, `snapshots/SHA/...`) at
`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
else `~/.cache/huggingface/hub`, looked up at call time. Only a model the
cache lacks is downloaded, and only where a hub is reachable
(`HF_HUB_OFFLINE=1` forbids trying); otherwise one line names the cache path.

`:QUANT` picks a GGUF file the way llama.cpp's `-hf` does: the file of the
repo whose name carries the quant (case-insensitive; a split model's first
part), `Q4_K_M` when no quant is given and the repo holds only GGUF files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rdnac.errors import CheckpointError

DEFAULT_GGUF_QUANT = "Q4_K_M"  # llama.cpp's -hf default
# ORG/NAME, then @REVISION (a branch, tag or commit), then :QUANT; the names as the Hub allows them
_MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<quant>[\w.-]+))?$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_HF_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt")


@dataclass(frozen=True)
class ModelId:
    repo: str  # ORG/NAME
    revision: str | None = None
    quant: str | None = None

    @property
    def name(self) -> str:
        return self.repo.split("/")[-1]

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.quant}" if self.quant else "")


@dataclass(frozen=True)
class Resolved:
    """A model id's local checkpoint: the HF directory or the .gguf file, and the commit it came from."""

    model_id: ModelId
    path: Path
    commit: str  # the snapshot's commit sha: what a plan cache keys on


def parse_model_id(spec: str) -> ModelId | None:
    """The ModelId of `spec`, or None when it names a local path or is no model id (`demo:`, `./x`, `/x`)."""
    if spec.startswith(("demo:", ".", "/", "~")) or Path(spec).exists():
        return None
    m = _MODEL_ID.match(spec)
    if m is None:
        return None
    return ModelId(m["repo"], m["revision"], m["quant"])


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(model_id: ModelId) -> Resolved:
    """The local checkpoint of `model_id`: from the cache if there, else downloaded where a hub is reachable."""
    cache = hub_cache_dir()
    snapshot = _cached_snapshot(model_id, cache)
    if snapshot is not None and _has_model(snapshot):
        try:
            return Resolved(model_id, _pick(snapshot, model_id), snapshot.name)
        except CheckpointError:  # the cache holds other quants of the repo
            if is_offline():
                raise
    elif is_offline():
        raise _absent(model_id, cache, "HF_HUB_OFFLINE is set, so nothing was downloaded")
    snapshot = _download(model_id, cache)
    return Resolved(model_id, _pick(snapshot, model_id), snapshot.name)


def _cached_snapshot(model_id: ModelId, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id.repo, revision=model_id.revision, cache_dir=cache,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _has_model(snapshot: Path) -> bool:
    return (snapshot / "config.json").exists() or bool(_gguf_files(snapshot))


def _gguf_files(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")
                  if "mmproj" not in p.name.lower())  # a vision projector is never the model


def _pick(snapshot: Path, model_id: ModelId) -> Path:
    """The checkpoint inside a snapshot: the directory (config.json), or the GGUF file the quant names."""
    files = _gguf_files(snapshot)
    if model_id.quant is None and ((snapshot / "config.json").exists() or not files):
        return snapshot
    name = pick_gguf(files, model_id)
    return snapshot / name


def pick_gguf(files: list[str], model_id: ModelId) -> str:
    """The GGUF file of `files` for the id's quant (llama.cpp -hf's rule), or one line listing the choices."""
    quant = model_id.quant or DEFAULT_GGUF_QUANT
    # the quant as a whole word of the file name: Q4_K does not pick Q4_K_M
    pattern = re.compile(rf"(^|[^a-z0-9]){re.escape(quant.lower())}([^a-z0-9_]|$)")
    matches = [f for f in files if pattern.search(Path(f).name.lower())]
    matches = [f for f in matches if not _SHARD.search(f) or _SHARD.search(f)[1] == "00001"]
    if len(matches) == 1:
        return matches[0]
    if model_id.quant is None and len(files) == 1:
        return files[0]
    available = sorted({_quant_of(f) for f in files}) or ["none"]
    got = f"{len(matches)} files match ({', '.join(matches)})" if matches else "no file matches"
    raise CheckpointError(f"{model_id}: requires one GGUF file for quant {quant}; {got}; the repo's quants: "
                          f"{', '.join(available)}; name one as {model_id.repo}:QUANT")


def _quant_of(filename: str) -> str:
    stem = _SHARD.sub(".gguf", Path(filename).name).removesuffix(".gguf")
    return re.split(r"[-.]", stem)[-1]


def _download(model_id: ModelId, cache: Path) -> Path:
    """Fetch what the model needs into the cache (the one GGUF for a quant; the HF files otherwise)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        files = HfApi().list_repo_files(model_id.repo, revision=model_id.revision)
        ggufs = sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower())
        if model_id.quant is not None or ("config.json" not in files and ggufs):
            chosen = pick_gguf(ggufs, model_id)
            shard = _SHARD.search(chosen)
            parts = [chosen] if shard is None else \
                [chosen.replace(f"-00001-of-{shard[2]}", f"-{i:05d}-of-{shard[2]}") for i in range(1, int(shard[2]) + 1)]
            for part in parts:
                path = Path(hf_hub_download(model_id.repo, part, revision=model_id.revision, cache_dir=cache))
            return path.parents[len(Path(chosen).parts) - 1]
        return Path(snapshot_download(model_id.repo, revision=model_id.revision, cache_dir=cache,
                                      allow_patterns=list(_HF_FILES)))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- no network, no such repo, a gated one: all end in the same advice
        raise _absent(model_id, cache, f"downloading it failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None


def _absent(model_id: ModelId, cache: Path, why: str) -> CheckpointError:
    folder = cache / f"models--{model_id.repo.replace('/', '--')}"
    return CheckpointError(f"{model_id}: requires the model in the Hugging Face cache {cache} ({folder}); got "
                           f"nothing usable there and {why}; download it where a hub is reachable "
                           f"(`hf download {model_id.repo}`) and copy the cache, set HF_HOME to the cache that "
                           f"holds it, or pass a local directory or .gguf file (no such path {model_id} exists here)")
