"""The benchmark scenarios: one module each, found by name.

A scenario module defines ``SCENARIO``, a subclass of :class:`harness.Scenario`. Adding a
scenario is adding a module here; ``python bench/run.py --list`` shows them all.
"""

from __future__ import annotations

import importlib
import pkgutil

from harness import Scenario


def available() -> dict[str, type[Scenario]]:
    """Every scenario, in the order of the modules' ``ORDER`` (then by name)."""
    found: list[tuple[int, str, type[Scenario]]] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "SCENARIO", None)
        if cls is not None:
            found.append((getattr(module, "ORDER", 100), cls.name, cls))
    return {name: cls for _, name, cls in sorted(found, key=lambda f: (f[0], f[1]))}
