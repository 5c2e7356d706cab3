"""What this device's torch can do, probed once per (device type, dtype): shared by the torch backend
(nash_fast.logprobs) and the Triton launcher (nash_fast.kernels.sequence_logprobs)."""

from __future__ import annotations

import torch

_MM_FP32_OUTPUT_WORKS: dict = {}


def mm_fp32_output_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(dtype, dtype, out_dtype=float32) runs here (CUDA in recent torch; not the CPU)."""
    key = (device.type, dtype)
    if key not in _MM_FP32_OUTPUT_WORKS:
        try:
            a = torch.ones(1, 1, device=device, dtype=dtype)
            _MM_FP32_OUTPUT_WORKS[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_FP32_OUTPUT_WORKS[key] = False
    return _MM_FP32_OUTPUT_WORKS[key]
