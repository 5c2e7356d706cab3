"""nash-fast: fused per-sequence log-probs and exact losses for general-preference alignment.

Public API:
    sequence_logprobs          per-sequence log p(y|x) from final hidden states and the LM-head weight
    FusedLinearPreferenceLoss  one call from hidden states to (loss, metrics) for every loss below
    FusedLinearDPOLoss         Liger-Kernel's LigerFusedLinearDPOLoss constructor and call on the same op
    losses                     sppo_loss, inpo_loss, ipo_loss, dpo_loss, sr_dpo_loss, sr_ipo_loss, spce_loss
"""

import importlib

__all__ = ["sequence_logprobs", "token_logprobs", "FusedLinearPreferenceLoss", "FusedLinearDPOLoss", "losses"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import nash_fast` stays light (no torch / transformers / deepspeed / triton import): the CLIs
    # (python -m nash_fast.train, ...) install their signal handlers before torch loads.
    if name in ("sequence_logprobs", "token_logprobs"):
        return getattr(importlib.import_module("nash_fast.logprobs"), name)
    if name == "losses":
        return importlib.import_module("nash_fast.losses")
    if name in ("FusedLinearPreferenceLoss", "FusedLinearDPOLoss"):
        return getattr(importlib.import_module("nash_fast.fused_loss"), name)
    raise AttributeError(f"module 'nash_fast' has no attribute {name!r}")
