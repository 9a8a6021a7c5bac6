"""Validation helpers every config shares: each raises a ``ValueError`` that names the field, the value and
what is allowed."""

from __future__ import annotations

import hashlib
import re
from typing import Any


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}.{name}={value!r} is not supported; choose one of {', '.join(repr(a) for a in allowed)}."
        )


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} must be an integer >= {minimum}.")


def check_number(owner: str, name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False,
                 low_inclusive: bool = True) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok_type and (value >= low if low_inclusive else value > low) and (
        value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{owner}.{name}={value!r} must be a number in {lo}{low}, {high}{hi}.")


def describe_object(obj: Any) -> str:
    """A stable, human-readable provenance string for an in-memory calibration source."""
    if isinstance(obj, (list, tuple)) and all(isinstance(t, str) for t in obj):
        digest = hashlib.sha256("\x00".join(obj).encode("utf-8")).hexdigest()[:16]
        return f"<in-memory list of {len(obj)} texts, sha256:{digest}>"
    fingerprint = getattr(obj, "_fingerprint", None)
    if fingerprint is not None:  # datasets.Dataset
        return f"<datasets.Dataset of {len(obj)} rows, fingerprint:{fingerprint}>"
    return f"<in-memory {type(obj).__name__}>"



def regex_list(owner: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must be a regex string or a non-empty list of them, got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{owner}.{name}: {pattern!r} is not a valid regular expression ({exc}).") from None
    return list(value)
