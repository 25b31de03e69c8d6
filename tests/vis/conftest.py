"""Every visualisation test starts from the same seed and runs single-threaded (``one_thread``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed_and_one_thread(one_thread: None) -> None:
    """Applies the shared ``one_thread`` fixture to every test of this folder."""
