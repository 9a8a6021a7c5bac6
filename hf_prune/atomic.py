"""Writes that are either complete or absent: ``atomic_output_dir`` for a folder, ``atomic_file`` for one file.

Both stage under a hidden temporary name next to the target and swap it in with ``os.replace`` only once the
write succeeded, so a reader (or a resumed run) never sees a half-written folder or file; a failure removes the
staged copy and leaves what was there before. A leaf: it imports only ``hf_prune.errors``, so the engine's
checkpoint and every artifact share it.

An output folder is never a place where a user's files are lost. ``check_output_dir`` holds the rules every
saver follows: an absent or empty folder is written; a folder whose every entry hf_prune wrote (the hidden
manifest ``OUTPUT_MANIFEST`` lists them) is replaced only with ``overwrite=True``; any other folder is refused;
the source model's folder, the working directory and their ancestors are always refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator

from .errors import OutputDirError

OUTPUT_MANIFEST = ".hf_prune_output.json"  # in every folder atomic_output_dir wrote: the entries it wrote
SHOWN_ENTRIES = 4  # how many of a folder's entries an error message names


def _nearest_existing(path: str) -> str:
    """``path`` itself or its nearest ancestor that exists."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_folder_writable(path: str | os.PathLike) -> str:
    """Raise ``OutputDirError`` unless files can be written into the folder ``path`` (it exists, or its nearest
    existing ancestor is a folder we may write); returns the absolute path. For writing single files into a
    folder; a folder that hf_prune replaces as a whole goes through ``check_output_dir``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"the output path {path!r} is a file, not a folder; choose another output folder.")
    _check_creatable(path, _nearest_existing(path))
    return path


def _check_creatable(path: str, probe: str) -> None:
    """``probe`` (the folder where ``path`` or its staged copy is created) must be a folder we may write."""
    if not os.path.isdir(probe):
        raise OutputDirError(f"cannot create the output folder {path!r}: {probe!r} is a file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"the output folder {path!r} cannot be written: no write permission on {probe!r}, "
                             "where hf_prune stages the folder before swapping it in; choose a folder you can "
                             "write to.")


def _is_within(inner: str, outer: str) -> bool:
    """Whether the real path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_protected(path: str, sources: Iterable[str | os.PathLike | None]) -> None:
    """Refuse ``path`` when replacing it would replace the working directory or a source model's folder (or a
    folder holding either), whatever ``overwrite`` says."""
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if _is_within(cwd, real):
        what = "the current working directory" if real == cwd else f"a folder holding the working directory {cwd!r}"
        raise OutputDirError(f"the output folder {path!r} is {what}; hf_prune replaces its output folder as a "
                             "whole, so it never writes there: choose a new folder, e.g. a subfolder.")
    for source in sources:
        if source is None or not os.path.isdir(os.fspath(source)):
            continue  # a Hub id, or nothing: no local folder to protect
        model = os.path.realpath(os.fspath(source))
        if _is_within(model, real):
            what = "the source model's folder" if real == model else f"a folder holding the source model {model!r}"
            raise OutputDirError(f"the output folder {path!r} is {what}; saving there would replace the model "
                                 "being pruned: choose another output folder.")


def _entries(folder: str) -> list[str]:
    """Every file, folder and link under ``folder`` as a '/'-separated path relative to it (links not followed)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(out)


def _written_entries(folder: str) -> set[str]:
    """The entries the manifest of ``folder`` says hf_prune wrote (empty when there is no readable manifest)."""
    try:
        with open(os.path.join(folder, OUTPUT_MANIFEST), encoding="utf-8") as fh:
            recorded = json.load(fh).get("entries")
    except (OSError, ValueError, AttributeError):
        return set()
    return {e for e in recorded if isinstance(e, str)} if isinstance(recorded, list) else set()


def _named(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN_ENTRIES])
    return shown + (f" and {len(entries) - SHOWN_ENTRIES} more" if len(entries) > SHOWN_ENTRIES else "")


def _check_contents(path: str, overwrite: bool) -> None:
    """An existing non-empty folder may be replaced only when hf_prune wrote every entry of it, and only with
    ``overwrite``; a folder holding anything else is refused, naming what hf_prune did not write."""
    if not os.path.isdir(path) or not os.listdir(path):
        return
    foreign = [e for e in _entries(path) if e != OUTPUT_MANIFEST and e not in _written_entries(path)]
    if foreign:
        raise OutputDirError(f"the output folder {path!r} holds files hf_prune did not write ({_named(foreign)}); "
                             "hf_prune never deletes them: choose a new or empty output folder.")
    if not overwrite:
        mine = [e for e in sorted(os.listdir(path)) if e != OUTPUT_MANIFEST]
        raise OutputDirError(f"the output folder {path!r} holds a previous hf_prune output ({_named(mine)}); "
                             "replace it with --overwrite (API: overwrite=True), or choose another output folder.")


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike | None] = ()) -> str:
    """Raise ``OutputDirError`` unless ``path`` can become a folder that hf_prune writes as a whole; returns the
    absolute path.

    ``path`` must not be a file, the working directory, one of ``sources`` (the local folders of the model being
    saved; Hub ids are skipped) or a folder holding any of them; if it exists and is not empty, hf_prune must
    have written every entry of it and ``overwrite`` must be True. The folder where it is staged and swapped in
    (its parent, or the nearest ancestor that exists) must be writable: checked here, not after a long run.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"the output path {path!r} is a file, not a folder; choose another output folder.")
    _check_protected(path, sources)
    _check_contents(path, overwrite)
    _check_creatable(path, _nearest_existing(os.path.dirname(path)))
    return path


def _staged_name(parent: str, name: str, kind: str) -> str:
    """A hidden sibling ``.NAME.KIND-PID-HEX`` of ``parent/name``: the pid tells a later save whether the process
    that staged it is gone."""
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can ask about: keep what it names
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or a platform without this probe: treat as alive
        return True
    return True


def remove_dead_saves(path: str | os.PathLike) -> list[str]:
    """Remove the staged folders that a killed save into ``path`` left next to it (``.NAME.partial-PID-...`` of a
    process that is gone; ``.NAME.old-PID-...`` only while ``path`` exists, since otherwise it is the one copy of
    the previous output). Returns what was removed; folders of live processes are kept."""
    final = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(final)
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|old)-(\d+)-[0-9a-f]+")
    try:
        siblings = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for entry in sorted(siblings):
        match = pattern.fullmatch(entry)
        full = os.path.join(parent, entry)
        if match is None or os.path.islink(full) or not os.path.isdir(full) or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.isdir(final):
            continue
        shutil.rmtree(full, ignore_errors=True)
        removed.append(full)
    return removed


def _write_manifest(folder: str) -> None:
    """Record every entry of the staged ``folder`` as written by hf_prune (sorted: the same folder, the same bytes)."""
    with open(os.path.join(folder, OUTPUT_MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({"written_by": "hf_prune", "entries": _entries(folder)}, fh, indent=1)
        fh.write("\n")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False,
                      sources: Iterable[str | os.PathLike | None] = ()) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on failure it is removed.

    ``path`` must pass ``check_output_dir(path, overwrite=..., sources=...)``, checked before anything is written
    and again just before the swap (a file added meanwhile stops it). Readers never see a half-written ``path``:
    it is swapped in by ``os.replace`` only once complete, with the manifest of what was written. The staged
    folder is created with the umask's permissions, like ``save_pretrained``'s folders, and is named after this
    process so that the next save removes it if this one is killed (``remove_dead_saves``).
    """
    sources = tuple(sources)
    final = check_output_dir(path, overwrite=overwrite, sources=sources)
    parent, name = os.path.split(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create the parent folder of {final!r}: {exc.strerror}.") from None
    remove_dead_saves(final)
    tmp = _staged_name(parent, name, "partial")
    os.mkdir(tmp)
    try:
        yield tmp
        _write_manifest(tmp)
        backup = None
        if os.path.isdir(final):
            _check_contents(final, overwrite)  # nothing foreign arrived while the folder was staged
            backup = _staged_name(parent, name, "old")
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
    tmp = _staged_name(*os.path.split(final), "partial")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
