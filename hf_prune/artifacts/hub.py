"""The Hugging Face Hub, for every artifact hf_prune writes: transport only (cards live in ``cards``).

Pushing never goes through ``transformers``' ``PushToHubMixin`` (it replaces the README that
``save_pretrained`` wrote with its default card). Instead an artifact's ``push_to_hub`` is one line::

    def push_to_hub(self, repo_id, **kwargs):
        return push_pretrained(lambda folder: self.save_pretrained(folder, repo_id=repo_id), repo_id, **kwargs)

``push_pretrained`` creates the repo first (so a missing network or token fails before anything is written),
saves into a temporary folder and commits that folder, card included, in one commit. ``push_folder`` pushes
a folder that is already on disk (``hf-prune push DIR REPO``). ``load_files`` finds an artifact's files in a
local folder or downloads them from a Hub repo. Hub failures become one-line ``HubError``s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterable

from ..errors import HubError, PushFolderError


def check_repo_id(repo_id: Any) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string such as 'your-name/model-name', got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repository id ({exc}); use "
                         "'your-name/model-name' with letters, digits, '-', '_' and '.'.") from None
    return repo_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _fix_hint(endpoint: str) -> str:
    return (f"check the network (or set HF_ENDPOINT to a Hub you can reach; now {endpoint}); to work offline, "
            "save with save_pretrained(folder) and push later with `hf-prune push FOLDER REPO`")


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str):
    """Turn what ``huggingface_hub``/its HTTP client raise into a one-line ``HubError`` naming the endpoint."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = _endpoint()
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(f"cannot {action} {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach "
                       f"{endpoint}, or save with save_pretrained(folder) and push later with "
                       "`hf-prune push FOLDER REPO`.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        server = (exc.server_message or str(exc)).strip().splitlines()[0] if (exc.server_message or str(exc)) else ""
        if status in (401, 403):
            raise HubError(f"the Hub at {endpoint} refused to {action} {repo_id!r} (HTTP {status}: {server}); "
                           "pass token=... (a token with write access, or run `hf auth login`) and check that you "
                           "may write to that namespace.") from None
        raise HubError(f"the Hub at {endpoint} answered HTTP {status} when asked to {action} {repo_id!r}: "
                       f"{server}") from None
    except httpx2.TransportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"cannot reach the Hugging Face Hub at {endpoint} to {action} {repo_id!r} "
                       f"({type(exc).__name__}: {reason}); {_fix_hint(endpoint)}.") from None
    except ValueError as exc:  # huggingface_hub's metadata validation ("Invalid metadata in README.md")
        if "metadata" not in str(exc):
            raise
        detail = " ".join(line.strip("- ") for line in str(exc).splitlines()[1:3])
        raise HubError(f"the Hub at {endpoint} rejected the model card's metadata when asked to {action} "
                       f"{repo_id!r}: {detail or exc}") from None


def _api(token: str | bool | None):
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise OfflineModeIsEnabled("offline")
    return HfApi(endpoint=_endpoint(), token=token)


def _open_repo(repo_id: str, *, private: bool | None, token: str | bool | None, revision: str | None,
               create_pr: bool):
    """Create the repo (and the ``revision`` branch) if needed; returns the ``HfApi`` to commit with."""
    with hub_errors("create the repo", repo_id):
        api = _api(token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api


def _link_target_inside(link: str, folder: str, top: str) -> None:
    """Raise ``PushFolderError`` unless the symbolic link ``link`` resolves to a path inside ``top`` (the real
    path of the pushed ``folder``)."""
    target = os.path.realpath(link)
    if target != top and not target.startswith(top.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(link, folder).replace(os.sep, "/")
        raise PushFolderError(f"cannot push {folder!r}: {rel} is a symbolic link to {target!r}, outside the folder; "
                              "only files inside the folder are uploaded: replace the link by a copy of what it "
                              "points to, or remove it.")


def folder_files(folder: str | os.PathLike) -> dict[str, str]:
    """``{path in repo: local path}`` of every file under ``folder``, skipping hidden files and folders
    (``.git``, ``.cache``, partial writes, hf_prune's output manifest).

    Only regular files inside the folder are listed: a symbolic link counts when what it points to lies inside
    the folder (a linked folder is not walked twice: its files are listed where they are); a link pointing out of
    the folder, or an entry that is not a regular file (a fifo, a broken link), raises ``PushFolderError`` naming
    it, so nothing from outside the folder is ever uploaded."""
    folder = os.fspath(folder)
    top = os.path.realpath(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        walked = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            if os.path.islink(os.path.join(root, name)):
                _link_target_inside(os.path.join(root, name), folder, top)
            else:
                walked.append(name)
        dirs[:] = walked
        for name in sorted(files):
            if name.startswith("."):
                continue
            local = os.path.join(root, name)
            rel = os.path.relpath(local, folder).replace(os.sep, "/")
            if os.path.islink(local):
                _link_target_inside(local, folder, top)
            if not os.path.isfile(local):
                raise PushFolderError(f"cannot push {folder!r}: {rel} is not a regular file (a broken link, a fifo "
                                      "or a device); remove it from the folder.")
            out[rel] = local
    return out


def _commit(api, repo_id: str, folder: str, local: dict[str, str], *, files: dict[str, bytes | str] | None,
            revision: str | None, create_pr: bool, commit_message: str, commit_description: str | None,
            path_in_repo: str | None):
    """Commit ``local`` (``folder_files(folder)``) plus ``files`` to ``repo_id`` in one commit."""
    from huggingface_hub import CommitOperationAdd

    sources: dict[str, Any] = dict(local)
    for path, content in (files or {}).items():
        sources[path] = content.encode("utf-8") if isinstance(content, str) else content
    if not sources:
        raise ValueError(f"nothing to push: {folder!r} holds no files.")
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    operations = [CommitOperationAdd(path_in_repo=prefix + path, path_or_fileobj=src)
                  for path, src in sorted(sources.items())]
    with hub_errors("upload to", repo_id):
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision,
                                 create_pr=create_pr, repo_type="model")


def _check_push_args(repo_id: Any, private: Any, create_pr: Any, revision: Any, commit_message: Any,
                     path_in_repo: Any = None) -> None:
    check_repo_id(repo_id)
    if path_in_repo is not None and (not isinstance(path_in_repo, str) or ".." in path_in_repo.split("/")):
        raise ValueError(f"path_in_repo must be a folder path inside the repo such as 'paths/run1', got "
                         f"{path_in_repo!r}.")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None (the namespace's default), got {private!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"create_pr must be True or False, got {create_pr!r}.")
    for name, value in (("revision", revision), ("commit_message", commit_message)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be a non-empty string or None, got {value!r}.")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                commit_message: str | None = None, commit_description: str | None = None,
                files: dict[str, bytes | str] | None = None, path_in_repo: str | None = None):
    """Push every file of ``folder`` to the model repo ``repo_id`` in one commit (creating the repo and the
    ``revision`` branch if needed); ``files`` adds or replaces files (``{path in folder: bytes or str}``), e.g. a
    re-rendered ``README.md``; ``path_in_repo`` puts everything under that folder of the repo.
    Returns ``huggingface_hub.CommitInfo`` (``.commit_url``, ``.pr_url``)."""
    _check_push_args(repo_id, private, create_pr, revision, commit_message, path_in_repo)
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot push {folder!r}: it is not a folder.")
    local = folder_files(folder)  # a link out of the folder is refused before the Hub is asked anything
    api = _open_repo(repo_id, private=private, token=token, revision=revision, create_pr=create_pr)
    return _commit(api, repo_id, folder, local, files=files, revision=revision, create_pr=create_pr,
                   commit_message=commit_message or f"Upload {os.path.basename(os.path.abspath(folder))} with hf_prune",
                   commit_description=commit_description, path_in_repo=path_in_repo)


def push_pretrained(save: Callable[[str], Any], repo_id: str, *, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    commit_message: str | None = None, commit_description: str | None = None,
                    path_in_repo: str | None = None):
    """Create the repo, then ``save(folder)`` into a temporary folder and commit it (card included) to
    ``repo_id`` (under ``path_in_repo`` if given). This is what every artifact's ``push_to_hub`` calls.
    Returns ``huggingface_hub.CommitInfo``."""
    _check_push_args(repo_id, private, create_pr, revision, commit_message, path_in_repo)
    api = _open_repo(repo_id, private=private, token=token, revision=revision, create_pr=create_pr)
    with tempfile.TemporaryDirectory(prefix="hf_prune-push-") as tmp:
        folder = os.path.join(tmp, repo_id.split("/")[-1])
        save(folder)
        return _commit(api, repo_id, folder, folder_files(folder), files=None, revision=revision, create_pr=create_pr,
                       commit_message=commit_message or "Upload with hf_prune", commit_description=commit_description,
                       path_in_repo=path_in_repo)


def load_files(path_or_repo: str | os.PathLike, names: Iterable[str], *, what: str, writer: str,
               subfolder: str | None = None, revision: str | None = None,
               token: str | bool | None = None) -> dict[str, str]:
    """``{name: local path}`` of an artifact's files: from the local folder ``path_or_repo`` (``/subfolder``), or
    downloaded from the Hub repo of that id. A local folder without them is a ``FileNotFoundError`` that names
    ``writer`` (what writes such a folder); ``what`` names the artifact in a ``HubError``."""
    path = os.fspath(path_or_repo)
    folder = os.path.join(path, subfolder) if subfolder else path
    out = {}
    for name in names:
        local = os.path.join(folder, name)
        if not os.path.isfile(local):
            if os.path.isdir(path):
                raise FileNotFoundError(f"no {name} in {folder!r}; was it written by {writer}?")
            from huggingface_hub import hf_hub_download

            with hub_errors(f"download {what} from", path):
                local = hf_hub_download(path, name, subfolder=subfolder, revision=revision, token=token)
        out[name] = local
    return out
