"""Shared test set-up. Triton kernels run under the interpreter on a machine with no CUDA GPU; the
variable must be set before triton is first imported, which is why it lives here."""
import os

# One thread per test process (children inherit it): the models under test are tiny, and on a 2-core
# machine two OpenMP threads per process thrash as soon as anything else runs (measured 20x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
