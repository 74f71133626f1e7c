"""A faulty version of the demo model for canary tests and bench.canary: a fresh copy of the bundled
model whose decoder misbehaves once told to, through a forward pre-hook (test-only: nothing in app/
knows about it). Healthy until `fault.mode` is set:

    fault = Fault()
    model = faulty_demo(fault)        # serve it as the canary version
    fault.mode = "raise"              # every decoder forward raises: the request fails with a 500
    fault.mode, fault.delay_s = "slow", 0.5   # every decoder forward takes delay_s longer
    fault.mode = ""                   # healthy again
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.models.families.coca import CoCaModel
from app.settings import BUNDLED_MODEL
from llm.hardware import resolve_dtype


class InjectedFault(RuntimeError):
    """What a raising canary's decoder raises."""


@dataclass
class Fault:
    mode: str = ""  # "" healthy, "raise", "slow"
    delay_s: float = 0.5
    started: float | None = None  # time.time() of the first faulty forward (rollback records are wall time)

    def set(self, mode: str, delay_s: float | None = None) -> None:
        self.mode, self.started = mode, None
        if delay_s is not None:
            self.delay_s = delay_s

    def hit(self) -> None:
        if not self.mode:
            return
        if self.started is None:
            self.started = time.time()
        if self.mode == "raise":
            raise InjectedFault("injected decoder fault")
        time.sleep(self.delay_s)


def faulty_demo(fault: Fault) -> CoCaModel:
    # its own copy: the hook must not reach the stable version; in the dtype the server computes in by
    # default, or it would serve a converted copy, which has no hook (ServedModel, FamilyModel.with_dtype)
    model = CoCaModel.from_dir(BUNDLED_MODEL, resolve_dtype("auto"))
    model.decoder.register_forward_pre_hook(lambda *_: fault.hit())
    return model
