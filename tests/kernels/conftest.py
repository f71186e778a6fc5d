"""Fixtures for the kernel tests: every op test runs on both backends."""

import pytest
import torch


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """The op tests build CPU tensors. The Triton backend runs them under the interpreter, which
    tests/conftest.py turns on only where there is no GPU; on a CUDA machine triton compiles for
    the GPU and refuses CPU tensors (as the op's contract says), and test_kernels_triton.py
    tests the kernel and the whole op on CUDA tensors instead."""
    if request.param == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors need the Triton interpreter, which is off on a CUDA "
                        "machine; test_kernels_triton.py covers the GPU")
    return request.param
