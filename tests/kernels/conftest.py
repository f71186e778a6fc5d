"""Fixtures for the kernel tests: every op test runs on both backends."""

import pytest


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """The Triton backend runs on CUDA, or on CPU under the interpreter (tests/conftest.py)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param
