"""A real headless browser for the live map's tests: Debian's Chromium driven by Playwright.

Playwright's own browser download cannot work here (no internet); the tests launch
``/usr/bin/chromium`` (``make test`` installs it with apt-get where it can). Without it the tests
skip, except under CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MESHSERVE_CHROMIUM", "/usr/bin/chromium")
#: screenshots of the map go here (look at them: tests/browser/README in docs/ui.md)
ARTIFACTS = (
    Path(
        os.environ.get(
            "MESHSERVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"
        )
    )
    / "browser"
)
_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",  # no calls to the internet from a closed machine
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A Chromium for one test module. Module scope, not session: Playwright's sync API holds
    an asyncio event loop on the main thread while it is open, and every later test that runs
    a loop of its own (``asyncio.run``, pytest-asyncio) would fail while it stays open."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no browser at {CHROMIUM}: `make test` installs Debian's chromium")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=_FLAGS)
        try:
            yield launched
        finally:
            launched.close()
