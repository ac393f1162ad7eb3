"""tropd: on-policy distillation losses (TrOPD, OPD, EOPD, REOPOLD, GKD, ...) and their gradients.

- ``tropd.torch``: every objective as a PyTorch autograd op (``distill_loss``, ``tropd_loss``,
  ``distill_loss_from_logprobs``, ...), CPU tensors (CUDA with the extension's CUDA build).
- ``tropd.presets``: the objective configs (``tropd.presets.tropd(k=64, beta=1e-3)``).
- ``tropd.evaluate_rows`` / ``tropd.evaluate_tokens``: the framework-neutral calls on numpy (or any
  DLPack) arrays, writing caller-allocated outputs.
- ``tropd.distributed``: the row level on vocabulary-sharded logits and data-parallel batches
  over ``torch.distributed`` process groups (one all-gather of row records per call).

``import tropd`` does not import torch; ``tropd.torch`` does (torch >= 2.4).
"""

from __future__ import annotations

import importlib

from . import _C, presets
from ._core import DIAGNOSTIC_NAMES, PROMPT, STUDENT, TEACHER, evaluate_rows, evaluate_tokens
from ._errors import EvaluationError, InvalidInputError, TropdError

__version__ = _C.__version__
cuda_compiled: bool = bool(_C.cuda_compiled)

__all__ = [
    "presets",
    "evaluate_rows",
    "evaluate_tokens",
    "DIAGNOSTIC_NAMES",
    "PROMPT",
    "TEACHER",
    "STUDENT",
    "TropdError",
    "InvalidInputError",
    "EvaluationError",
    "cuda_compiled",
]


def __getattr__(name):  # tropd.torch on first use, so that `import tropd` needs no torch
    if name in ("torch", "distributed"):
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'tropd' has no attribute {name!r}")
