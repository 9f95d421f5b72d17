"""Kernel selection's walk over one node's candidates, without a whole plan: for tests that a node of a given
shape reaches a config that fits a target (within LDS, no spills)."""

from __future__ import annotations

from typing import Callable


def first_fitting(family: str, problem: dict, target: str, launch: Callable[[dict, object], None],
                  max_tries: int) -> tuple[dict, list]:
    """Walk `family`'s candidate order for `problem` as select_kernels does: record launch(config, recorder)'s
    calls, compile them for `target`, reject configs whose binaries spill or overflow LDS. Returns
    (chosen, [(rejected config, problems)]); fails after `max_tries` candidates."""
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.passes.select_kernels import _candidates
    from rdnac.compiler.record import RecordingLauncher
    from rdnac.targets import get_target

    rejected = []
    for config, _why in _candidates(family, problem, get_target(target))[:max_tries]:
        rec = RecordingLauncher()
        launch(config, rec)
        problems = [p for b in compile_calls(rec.calls, target, quiet=True) for p in check_resources(b, target)]
        if not problems:
            return config, rejected
        rejected.append((config, problems))
    raise AssertionError(f"{target}: none of the first {max_tries} candidates fits: {rejected}")
