"""The executable's tests: `make dist-test` builds it (`make dist`) and names it in SHOAL_DIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import cli  # noqa: F401  (a fixture these tests share)


@pytest.fixture(scope="session")
def executable() -> Path:
    path = os.environ.get("SHOAL_DIST", "")
    if not path:
        pytest.fail("SHOAL_DIST names no executable: run these with `make dist-test`")
    return Path(path)
