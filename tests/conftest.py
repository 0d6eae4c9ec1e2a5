"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test (exact numbers do not depend on the thread count; faster for
    tiny tensors), the previous count restored afterwards. Use: ``pytestmark =
    pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
