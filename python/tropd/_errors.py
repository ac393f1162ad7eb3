"""Python exceptions for tropd's status codes (tropd/core/status.hpp)."""

from __future__ import annotations

__all__ = ["TropdError", "InvalidInputError", "EvaluationError", "raise_status"]

# The order of tropd::errc (tropd/core/status.hpp).
ERRC = (
    "ok",
    "empty_batch",
    "shape_mismatch",
    "id_out_of_range",
    "non_finite_input",
    "no_finite_entry",
    "infinite_divergence",
    "duplicate_topk_id",
    "invalid_topk_list",
    "invalid_parameter",
    "insufficient_scratch",
    "unsupported",
    "backend_error",
)

# Arguments the caller got wrong (shapes, ids, lists, parameters, a combination of objective and
# inputs the entry point does not support): ValueError. Values the computation cannot use
# (NaN / +inf, a distribution with no finite entry, an infinite divergence), or a CUDA error:
# RuntimeError.
_VALUE_CODES = frozenset(
    {
        "empty_batch",
        "shape_mismatch",
        "id_out_of_range",
        "duplicate_topk_id",
        "invalid_topk_list",
        "invalid_parameter",
        "unsupported",
        "insufficient_scratch",
    }
)


class TropdError(Exception):
    """A failed tropd status.

    Attributes: ``code`` (the tropd::errc name, e.g. ``"non_finite_input"``), ``row`` (the
    flattened token / row index, -1 if none), ``column`` (vocabulary id or list entry, -1 if
    none), ``sequence`` and ``position`` (the row's sequence and its position in it, or -1).
    """

    def __init__(self, message: str, code: str, row: int = -1, column: int = -1, sequence: int = -1, position: int = -1):
        super().__init__(message)
        self.code = code
        self.row = row
        self.column = column
        self.sequence = sequence
        self.position = position


class InvalidInputError(TropdError, ValueError):
    """Bad arguments: shapes, ids, top-k lists, parameters, an unsupported combination."""


class EvaluationError(TropdError, RuntimeError):
    """Values tropd cannot evaluate (NaN / +inf inputs, infinite divergences) or a backend error."""


def _locate(row: int, seq_offsets) -> tuple[int, int]:
    """(sequence, position) of a flattened row, from CSR offsets (a CPU tensor / array / list)."""
    if row < 0 or seq_offsets is None:
        return -1, -1
    try:
        offs = [int(x) for x in seq_offsets.tolist()] if hasattr(seq_offsets, "tolist") else [int(x) for x in seq_offsets]
    except Exception:  # a device tensor we do not want to read here
        return -1, -1
    for j in range(len(offs) - 1):
        if offs[j] <= row < offs[j + 1]:
            return j, row - offs[j]
    return -1, -1


def raise_status(result, seq_offsets=None) -> None:
    """Raises the exception of a failed status tuple (int(errc), row, column, message) from tropd._C."""
    if result is None:
        return
    code, row, col, message = result
    if code == -1:
        raise NotImplementedError(message)
    name = ERRC[code] if 0 <= code < len(ERRC) else f"errc_{code}"
    seq, pos = _locate(row, seq_offsets)
    if seq >= 0:
        message = f"{message} [sequence {seq}, position {pos}]"
    cls = InvalidInputError if name in _VALUE_CODES else EvaluationError
    raise cls(message, name, row, col, seq, pos)
