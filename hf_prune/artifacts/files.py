"""Output folders that are either complete or absent: checked before work starts, written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ..errors import OutputDirError


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
def atomic_output_dir(path: str | os.PathLike):
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
