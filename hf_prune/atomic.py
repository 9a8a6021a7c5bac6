"""Writes that are either complete or absent: ``atomic_output_dir`` for a folder, ``atomic_file`` for one file.

Both stage under a hidden temporary name next to the target and swap it in with ``os.replace`` only once the
write succeeded, so a reader (or a resumed run) never sees a half-written folder or file; a failure removes the
staged copy and leaves what was there before. A leaf: it imports only ``hf_prune.errors``, so the engine's
checkpoint and every artifact share it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

from .errors import OutputDirError


def check_output_dir(path: str | os.PathLike) -> str:
    """Raise ``OutputDirError`` unless ``path`` can become a folder we write; returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"the output path {path!r} is a file, not a folder; choose another output folder.")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputDirError(f"cannot create the output folder {path!r}: {probe!r} is a file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"the output folder {path!r} is not writable (no write permission on {probe!r}); "
                             "choose a folder you can write to.")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on failure it is removed.

    Readers never see a half-written ``path``: it is swapped in by ``os.replace`` only once complete.
    """
    final = check_output_dir(path)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create the parent folder of {final!r}: {exc.strerror}.") from None
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.partial-", dir=parent)
    try:
        yield tmp
        backup = None
        if os.path.isdir(final):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.rmdir(backup)
            os.replace(final, backup)
        try:
            os.replace(tmp, final)
        except OSError:
            if backup:
                os.replace(backup, final)
            raise
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name next to ``path`` for the caller to write; on success the file is flushed to disk
    (fsync) and renamed to ``path``, on failure it is removed and ``path`` keeps its old content.

    The staged name is hidden (``.NAME.partial-...``) and not created here, so the writer creates it with the
    usual permissions. Nest two of these to commit two files together: the inner one is renamed first, and a
    failure in either renames neither.
    """
    final = os.fspath(path)
    folder, name = os.path.split(final)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
