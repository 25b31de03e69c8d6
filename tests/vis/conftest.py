"""Every visualisation test starts from the same seed and runs single-threaded.

The test models are tiny; with two intra-op threads on a shared 2-core machine they run up to
20x slower (threads wait on each other), so each test uses one thread and restores the setting.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
