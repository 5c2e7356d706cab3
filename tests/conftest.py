import os

# Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

# CI has 2 cores and a 30-minute budget; property tests draw a modest number of examples and
# never fail on wall-clock (the interpreter is slow and other processes share the cores).
settings.register_profile("ci", max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
