"""Kernels tests: GPU-marked tests skip without CUDA; `each_backend` runs a test on every backend here."""

import pytest
import torch

import kernels


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The interpreted kernels and the per-token oracles run many tiny ops, which gain nothing from threads; on a
    busy machine, waiting for a second thread made them 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["active", "torch"])
def each_backend(request):
    """The backend this machine runs (interpreter, compiled or torch), then the plain-PyTorch one."""
    previous = kernels.backend()
    if request.param == "torch":
        kernels.set_backend("torch")
    yield kernels.backend()
    kernels.set_backend("torch" if previous == "torch" else "triton")
