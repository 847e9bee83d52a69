"""Session-wide test setup.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, i.e. when ``fastode.kernels`` is first
imported, so the choice is made here, before any test module is imported: on a machine without CUDA the
Triton kernel tests run in the CPU interpreter (marked ``interpret``); with CUDA they run compiled (marked
``gpu``). Nothing else in fastode uses Triton on CPU tensors unless asked to, so the other tests are
unaffected. Set ``TRITON_INTERPRET`` yourself to override.
"""
import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402  (after the TRITON_INTERPRET choice above, which must come first)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (restored afterwards): for comparisons against
    finite differences and analytic values that float32 rounding would blur. Use with
    ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
