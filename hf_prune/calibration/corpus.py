"""A built-in corpus of real English prose that needs no network: the docstrings of Python's stdlib.

``builtin:python-docs`` yields paragraphs of prose (doctest lines and code-like text are dropped) from
the top-level modules of the running interpreter's standard library. The modules are split by name
into a ``train`` part (4 of every 5 modules, in sorted order) and a ``test`` part (the others, less
any paragraph that also occurs in ``train``), so a
calibration set and a held-out evaluation set never share text. The exact content depends on the
Python version, which provenance records.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import sysconfig

from ..errors import CalibrationDataError

BUILTIN_PREFIX = "builtin:"
CORPORA = ("python-docs",)
SPLITS = ("train", "test")


def _paragraphs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            for para in re.split(r"\n\s*\n", doc or ""):
                lines = [line.strip() for line in para.splitlines()]
                if not lines or any(line.startswith((">>>", "...", "$ ")) for line in lines):
                    continue
                text = " ".join(lines)
                if len(text) < 60 or "===" in text or "---" in text:
                    continue
                if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.85:
                    continue
                out.append(text)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


@functools.lru_cache(maxsize=4)
def python_docs(split: str = "train") -> tuple[str, ...]:
    if split not in SPLITS:
        raise CalibrationDataError(f"builtin:python-docs has splits {SPLITS}, not {split!r}.")
    stdlib = sysconfig.get_paths()["stdlib"]
    try:
        files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))
    except OSError:
        files = []
    chosen = [f for i, f in enumerate(files) if (i % 5 == 4) == (split == "test")]
    texts = tuple(p for f in chosen for p in _paragraphs(os.path.join(stdlib, f)))
    if split == "test":  # some docstrings are repeated across modules: keep the splits disjoint
        seen = set(python_docs("train"))
        texts = tuple(t for t in texts if t not in seen)
    if not texts:
        raise CalibrationDataError(
            f"builtin:python-docs found no stdlib sources under {stdlib!r} (this Python ships without .py "
            "files); pass your own calibration texts instead.")
    return texts


def builtin_texts(name: str, split: str = "train") -> tuple[str, ...]:
    """Texts of a built-in corpus, e.g. ``builtin_texts("builtin:python-docs", "test")``."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key == "python-docs":
        return python_docs(split)
    raise CalibrationDataError(f"unknown built-in corpus {name!r}; available: "
                               f"{', '.join(BUILTIN_PREFIX + c for c in CORPORA)}.")


def builtin_provenance(name: str, split: str) -> dict:
    return {"corpus": name, "split": split, "python": sys.version.split()[0]}
