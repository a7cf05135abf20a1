import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny image models run faster on one thread: on a shared 2-core machine, OpenMP spin-waiting between
    two threads made a 4×4 U-Net forward ~50× slower (measured 2.4 s vs 0.05 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
