"""Runners of the parity harness, one module per golden case.

Every module here defines `CASE` (the golden case name) and `run(golden, benchmark_repeats) ->
parity.CaseResult`; they are discovered automatically, so adding a case is adding a module.
"""
from __future__ import annotations

import importlib
import pkgutil


def _discover() -> dict:
    runners = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        runners[module.CASE] = module.run
    return runners


RUNNERS = _discover()
