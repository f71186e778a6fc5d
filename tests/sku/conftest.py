"""Fixtures for the sku tests (helpers that tests import live in tests/support/sku.py)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Module-scoped, so module fixtures that build models get it too: on tiny models a second
    thread only adds synchronisation, and contention on a shared two-core machine (3x slower
    suites)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The tiny Llama of tests.support.sku.tiny_model, saved once per session."""
    from tests.support.sku import tiny_model

    return tiny_model("llama", tmp_path_factory.getbasetemp())
