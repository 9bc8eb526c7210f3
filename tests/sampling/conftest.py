import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model's ops take microseconds: a second intra-op thread only adds synchronisation
    # (measured 0.18 s vs 6 s per 64 px image on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
