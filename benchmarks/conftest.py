"""pytest-benchmark files in this folder time things; without timing they have nothing to report.

pyproject's addopts pass ``--benchmark-disable`` (so the unit tests never time anything), and
these files read the timing statistics, so without ``--benchmark-enable`` every benchmark here
is skipped with a pointer to the flag, before any model or data is loaded.
"""

from __future__ import annotations

import pytest


def timing_disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


def pytest_collection_modifyitems(config, items):
    if not timing_disabled(config):
        return
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            path = item.path.relative_to(config.rootpath) if item.path.is_relative_to(config.rootpath) else item.path
            item.add_marker(pytest.mark.skip(
                reason=f"timing is off (--benchmark-disable): run python -m pytest {path} --benchmark-enable"))
