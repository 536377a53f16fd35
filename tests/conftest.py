"""Shared test set-up. Triton kernels run under the interpreter on a machine with no CUDA GPU; the
variable must be set before triton is first imported, which is why it lives here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import grokfast  # noqa: E402,F401  (sets MKL_CBWR before the first matrix product: see grokfast/__init__.py)

# torch's thread count before the pin below: what a user's process gets on this machine.
DEFAULT_THREADS = torch.get_num_threads()

# One thread in the test process itself, for speed only (results do not depend on it: see
# tests/test_determinism.py): the models under test are tiny, and on a 2-core machine two OpenMP threads
# per process thrash as soon as anything else runs (measured 20x slower). Child processes are not pinned:
# the CLI, resume and torchrun tests run at the machine's default thread count, as users do.
torch.set_num_threads(1)


@pytest.fixture
def default_threads():
    """torch at the machine's default thread count for one test (in this process); yields the count."""
    torch.set_num_threads(DEFAULT_THREADS)
    yield DEFAULT_THREADS
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def unpinned_env() -> dict:
    """os.environ without thread pins, for child processes that must run as a user's would."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

