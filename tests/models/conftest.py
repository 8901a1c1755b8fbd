import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: intra-op threads only add overhead, and stall on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
