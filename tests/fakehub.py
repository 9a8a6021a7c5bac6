"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing pushes and downloads without the network.

It speaks the subset of the Hub's HTTP API that ``huggingface_hub`` 2.x uses to create a repo, commit
files, list a repo (model info with its files, the file tree) and download them (``resolve``); ``add_repo`` seeds
a repo the way a push would. Commits: (``preupload`` answers ``"regular"`` for every file, so the client inlines the bytes as base64 in the
NDJSON commit and needs no LFS/Xet endpoints), open branches and pull requests, validate card YAML, and
serve the files back (``/resolve/``) so that ``from_pretrained(repo_id)`` can read what was pushed.

Use it through the ``fake_hub`` fixture of ``conftest.py``; ``FakeHub.repos`` holds what arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class Repo:
    repo_id: str
    private: bool | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)
    pull_requests: list[dict] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files

    @property
    def files(self) -> dict[str, bytes]:
        return self.branches["main"]

    def resolve(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit oid, files) of a branch, a PR ref or a commit oid."""
        if rev in self.branches:
            return self.heads[rev], self.branches[rev]
        if rev in self.snapshots:
            return rev, self.snapshots[rev]
        return None


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    status: int = 0


class FakeHub:
    """The server and what it holds. ``deny_token``: answer 401 to requests carrying this token."""

    def __init__(self, *, deny_token: str | None = None):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.deny_token = deny_token
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def card(self, repo_id: str, revision: str = "main") -> tuple[dict, str]:
        """(YAML metadata, markdown body) of the README that arrived."""
        text = self.repos[repo_id].branches[revision]["README.md"].decode("utf-8")
        match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
        assert match, "the README has no YAML front matter"
        return yaml.safe_load(match.group(1)), match.group(2)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
                 private: bool = False) -> str:
        """Put ``files`` on ``branch`` of ``repo_id`` (created if needed) as one commit, the way a push would
        leave them; returns the commit oid (``revision=`` that oid resolves too)."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private))
            base = dict(repo.branches.get(branch, repo.files))
            base.update(files)
            oid = hashlib.sha1(json.dumps([repo_id, branch, sorted((k, _oid(v)) for k, v in base.items())])
                               .encode()).hexdigest()
            repo.branches[branch] = base
            repo.heads[branch] = oid
            repo.snapshots[oid] = dict(base)
            repo.commits.append({"revision": branch, "oid": oid, "summary": "seeded by the test", "description": "",
                                 "files": sorted(files)})
        return oid


def validate_card(content: str) -> list[str]:
    """What the Hub checks in a README's metadata: YAML front matter that parses to a mapping, and the
    shape of the fields hf_prune writes (``library_name``, ``tags``, ``base_model``, ``model-index``)."""
    match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
    if not match:
        return []  # a card without metadata is allowed
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["the metadata must be a YAML mapping"]
    problems = []
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        problems.append('"library_name" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        problems.append('"tags" must be a list of strings')
    base = meta.get("base_model")
    for b in ([base] if isinstance(base, str) else base or []):
        if not (isinstance(b, str) and re.match(r"^[\w.-]+/[\w.-]+$", b)):
            problems.append(f'"base_model" must be a Hub model id, got {b!r}')
    for entry in meta.get("model-index") or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            problems.append('"model-index" entries need a "name"')
            continue
        for result in entry.get("results") or []:
            ok = (isinstance(result.get("task"), dict) and result["task"].get("type")
                  and isinstance(result.get("dataset"), dict) and result["dataset"].get("type")
                  and result["dataset"].get("name") and result.get("metrics")
                  and all(isinstance(m, dict) and m.get("type") and "value" in m for m in result["metrics"]))
            if not ok:
                problems.append(f'"model-index" result is malformed: {result!r}')
    return problems


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # ---------------------------------------------------------------------------- plumbing
        def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
                  headers: dict | None = None) -> None:
            hub.requests[-1].status = status
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), headers=headers)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message}, headers={"X-Error-Message": message.splitlines()[0][:200]})

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _start(self) -> tuple[str, dict] | None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with hub._lock:
                hub.requests.append(Request(self.command, path, query,
                                            {k.lower(): v for k, v in self.headers.items()}))
            auth = self.headers.get("Authorization", "")
            if hub.deny_token and auth == f"Bearer {hub.deny_token}":
                self._body()
                self._error(401, "Invalid credentials in Authorization header")
                return None
            return path, query

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, json.dumps({"error": "Repository not found"}).encode(),
                           headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return repo

        # ---------------------------------------------------------------------------- routes
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            started = self._start()
            if started is None:
                return
            path, query = started
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                    else payload["name"]
                with hub._lock:
                    if repo_id in hub.repos:  # the Hub names the existing repo's url in its 409
                        message = "You already created this model repo"
                        return self._json(409, {"error": message, "url": f"{hub.endpoint}/{repo_id}"},
                                          headers={"X-Error-Message": message})
                    hub.repos[repo_id] = Repo(repo_id, payload.get("visibility") == "private"
                                              if "visibility" in payload else payload.get("private"))
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                problems = validate_card(json.loads(body).get("content", ""))
                if problems:
                    return self._json(400, {"errors": [{"message": p} for p in problems]},
                                      headers={"X-Error-Message": problems[0].splitlines()[0][:200]})
                return self._json(200, {})
            match = re.match(r"^/api/models/(.+?)/(preupload|commit|branch)/(.+)$", path)
            if match:
                repo = self._repo(match.group(1))
                if repo is None:
                    return None
                kind, rev = match.group(2), match.group(3)
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if kind == "branch":
                    with hub._lock:
                        if rev in repo.branches:
                            return self._error(409, "Reference already exists")
                        repo.branches[rev] = dict(repo.files)
                        repo.heads[rev] = repo.heads["main"]
                        repo.snapshots.setdefault(repo.heads["main"], dict(repo.files))
                    return self._json(200, {})
                return self._commit(repo, rev, body, create_pr=query.get("create_pr") == ["1"])
            match = re.match(r"^/api/models/(.+?)/discussions$", path)
            if match:
                return self._error(501, "discussions are not implemented by the fake Hub")
            return self._error(404, f"no route POST {path}")

        def _commit(self, repo: Repo, rev: str, body: bytes, *, create_pr: bool) -> None:
            lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            changes: dict[str, bytes | None] = {}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    changes[value["path"]] = None
                elif line["key"] in ("lfsFile", "deletedFolder", "copyFile"):
                    return self._error(400, f"the fake Hub does not take {line['key']!r} lines")
            with hub._lock:
                if create_pr:
                    number = len(repo.pull_requests) + 1
                    target = f"refs/pr/{number}"
                    repo.branches[target] = dict(repo.branches.get(rev, repo.files))
                    repo.heads[target] = repo.heads.get(rev, repo.heads["main"])
                    repo.pull_requests.append({"num": number, "title": header["summary"], "ref": target})
                else:
                    target = rev
                    if target not in repo.branches:
                        return self._error(404, f"Invalid rev id: {rev}")
                files = repo.branches[target]
                for name, data in changes.items():
                    if data is None:
                        files.pop(name, None)
                    else:
                        files[name] = data
                oid = hashlib.sha1(json.dumps([repo.heads[target], header, sorted(changes)]).encode()).hexdigest()
                repo.heads[target] = oid
                repo.snapshots[oid] = dict(files)
                repo.commits.append({"revision": target, "oid": oid, "summary": header["summary"],
                                     "description": header.get("description", ""), "files": sorted(changes)})
            out = {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid}
            if create_pr:
                out["pullRequestUrl"] = f"{hub.endpoint}/{repo.repo_id}/discussions/{len(repo.pull_requests)}"
            return self._json(200, out)

        def do_GET(self) -> None:  # noqa: N802
            started = self._start()
            if started is None:
                return
            path, _ = started
            if path == "/api/whoami-v2":
                return self._json(200, {"type": "user", "name": "tester", "auth": {}})
            match = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
            if match:
                return self._tree(match.group(1), match.group(2), (match.group(3) or "").strip("/"),
                                  recursive=_.get("recursive") == ["true"] or _.get("recursive") == ["True"])
            match = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
            if match:
                repo = self._repo(match.group(1))
                if repo is None:
                    return None
                resolved = repo.resolve(match.group(2) or "main")
                if resolved is None:
                    return self._error(404, f"Invalid rev id: {match.group(2)}")
                oid, files = resolved
                return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": oid,
                                        "private": bool(repo.private),
                                        "siblings": [{"rfilename": f} for f in sorted(files)]})
            match = re.match(r"^/([^/]+/[^/]+)/resolve/(.+?)/(.+)$", path)
            if match:
                return self._resolve(*match.groups())
            return self._error(404, f"no route GET {path}")

        do_HEAD = do_GET

        def _tree(self, repo_id: str, rev: str, folder: str, *, recursive: bool) -> None:
            """The Hub's file tree (``list_repo_tree``): the files and folders under ``folder`` at ``rev``."""
            resolved = self._revision(repo_id, rev)
            if resolved is None:
                return None
            _, files = resolved
            prefix = f"{folder}/" if folder else ""
            entries: dict[str, dict] = {}
            for name, data in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):].split("/")
                for depth in range(1, len(rest)):  # the folders on the way
                    if depth == 1 or recursive:
                        sub = prefix + "/".join(rest[:depth])
                        entries.setdefault(sub, {"type": "directory", "oid": "0" * 40, "size": 0, "path": sub})
                if len(rest) == 1 or recursive:
                    entries[name] = {"type": "file", "oid": _oid(data), "size": len(data), "path": name}
            if folder and not entries:
                return self._send(404, b"", headers={"X-Error-Code": "EntryNotFound",
                                                    "X-Error-Message": f"{folder} does not exist on {rev}"})
            return self._send(200, json.dumps(list(entries.values())).encode())

        def _revision(self, repo_id: str, rev: str) -> tuple | None:
            """``(commit, files)`` of ``repo_id`` at ``rev``, or None after answering the Hub's 404 for it."""
            repo = self._repo(repo_id)
            if repo is None:
                return None
            resolved = repo.resolve(rev)
            if resolved is None:
                self._send(404, b"", headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return resolved

        def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
            resolved = self._revision(repo_id, rev)
            if resolved is None:
                return None
            oid, files = resolved
            if filename not in files:
                return self._send(404, b"", headers={"X-Error-Code": "EntryNotFound",
                                                    "X-Error-Message": "Entry not found", "X-Repo-Commit": oid})
            data = files[filename]
            return self._send(200, data, content_type="application/octet-stream",
                              headers={"ETag": f'"{_oid(data)}"', "X-Repo-Commit": oid})

    return Handler
