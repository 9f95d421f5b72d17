"""After a failed step, whether the engine can still run its model (`LLMEngine.step`'s failure handling).

When every request of a failed step fails even alone, the engine cannot tell a bad request from a lost
device or a broken plan; `probe_model` runs one token of a fixed prompt in blocks of its own to decide.
"""

from __future__ import annotations

import logging

from rdnac.runtime.block_manager import BlockManager
from rdnac.runtime.model_runner import ModelRunner, StepEntry

log = logging.getLogger("rdnac.engine")


def probe_model(runner: ModelRunner, block_manager: BlockManager) -> bool:
    """Whether the model still runs: one token of a fixed prompt, alone, in blocks of its own, after a step in
    which every request failed. A request that fails by itself (whatever it holds) leaves the probe
    running, so no request, however often sent, can mark the engine failed; a lost GPU or a broken plan
    fails the probe too. Without a free block (or state slot) there is no probe: the step's requests
    freed theirs, so the next failure probes."""
    probe = [0]
    if not block_manager.can_allocate(probe):
        return True
    table, _ = block_manager.allocate(probe)
    slot = block_manager.take_slot()
    try:
        runner.execute([StepEntry(probe, table, 0, 1, slot)]).logits.cpu()  # .cpu(): waits for the device
    except Exception as e:  # noqa: BLE001 -- the probe's failure is the finding, reported by step()
        log.error("rdnac: the one-token probe after a failed step failed too: %s: %s", type(e).__name__, e)
        return False
    finally:
        block_manager.free(table)
        block_manager.free_slot(slot)
    log.warning("rdnac: the one-token probe after a failed step ran: the failure was the requests'; serving on")
    return True


def first_line(error: Exception) -> str:
    """The first line of an exception's message (the engine's failure names it in one line)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
