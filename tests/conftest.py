"""The tests read ../shared (golden fixtures, images) beside the checkout; golden.py computes the path once."""

from __future__ import annotations

import pytest

from golden import DATA_DIR, GOLDEN_DIR


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [str(p) for p in (GOLDEN_DIR, DATA_DIR) if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: the tests need ../shared beside the checkout")
