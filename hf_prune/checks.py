"""Validation helpers every config shares: each raises a ``ValueError`` that names the field, the value and
what is allowed."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import regex


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}.{name}={value!r} is not supported; choose one of {', '.join(repr(a) for a in allowed)}."
        )


def check_int(owner: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}.{name}={value!r} must be an integer {allowed}.")


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


DATA_EXTENSIONS = (".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_path(text: str, extensions: tuple[str, ...] = ()) -> bool:
    """Whether ``text`` can only mean a local path, never a Hub id (``name`` or ``owner/name``): it starts with
    ``.``, ``/`` or ``~``, holds a backslash or more than one ``/``, or ends with one of ``extensions``. A missing
    file named so is reported as missing at once instead of being looked up on the Hub."""
    return not _HUB_ID.fullmatch(text) or ".." in text or text.lower().endswith(tuple(extensions))


def regex_list(owner: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must be a regex string or a non-empty list of them, got {value!r}.")
    for pattern in value:
        try:
            regex.compile(pattern)  # the engine that matches it (hf_prune.engine.targets, with a time bound)
        except regex.error as exc:
            raise ValueError(f"{owner}.{name}: {pattern!r} is not a valid regular expression ({exc}).") from None
    return list(value)
