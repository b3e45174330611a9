"""A Hub-compatible HTTP server for tests: the endpoints the real ``huggingface_hub`` client calls, in memory.

It serves model repositories with git-like history (a commit per push, branches pointing at commits) and answers:

- ``POST /api/repos/create``; ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and siblings);
- ``POST /api/validate-yaml`` (model card metadata);
- ``POST /api/models/{repo}/preupload/{rev}``, then ``POST /{repo}.git/info/lfs/objects/batch`` and the LFS
  ``upload`` action (on a second origin, like a storage bucket) and ``verify``, then ``POST .../commit/{rev}`` (ndjson);
- ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``, ``GET .../refs``, ``POST .../branch/{name}``;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: regular files inline with ``ETag`` and ``X-Repo-Commit``; LFS
  files as a 302 to the storage origin with ``X-Linked-Etag`` / ``X-Linked-Size``.

Writes need ``Authorization: Bearer <token>`` with a token from ``tokens`` (401 otherwise). Every request is kept in
``requests`` (method, path, headers, body) for tests to inspect. `inject` makes chosen requests slow or failing (an
HTTP status, or a dropped connection after the body was read); `stop` / `start` take the server down and back up on the
same port.

Example:
  >>> server = HubServer(tokens={"hf_secret"}).start()
  >>> os.environ["HF_ENDPOINT"] = server.url
  >>> server.stop()
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.msgpack", "*.h5", "*.pt", "*.ckpt", "*.npz", "*.zip")


class Drop(Exception):
    """Close the connection without answering."""


class Reply(Exception):
    """An HTTP error answer: status, JSON body, and ``X-Error-Code`` / ``X-Error-Message`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Entry:
    """One file of a commit: its bytes, git blob id, and the sha256 when stored in LFS."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        content = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, Entry]
    message: str
    parent: str | None


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(self, revision: str) -> Commit:
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


@dataclass
class Fault:
    match: str
    status: int | None
    drop: bool
    delay: float
    skip: int
    times: int


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class HubServer:
    """The in-memory Hub. ``url`` is the API origin; LFS uploads and downloads use ``storage_url`` (another origin,
    so the client treats it like a storage bucket: no redirects followed with credentials, no auth header sent).

    Args:
      tokens: Tokens that may write (and read private repositories).
      lfs_threshold: Files at least this large go through LFS (as do ``LFS_PATTERNS`` files of any size).
    """

    def __init__(self, *, tokens: set[str] = frozenset(), lfs_threshold: int = 10 * 2**20):
        self.tokens, self.lfs_threshold = set(tokens), lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self.port = 0
        self.connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> HubServer:
        """Starts serving on 127.0.0.1 (the same port as before after a `stop`); returns the server."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stops serving: open keep-alive connections are cut and new ones refused until `start`. Repositories are
        kept."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_url(self) -> str:
        return f"http://localhost:{self.port}"

    def inject(
        self,
        match: str = "",
        *,
        status: int | None = None,
        drop: bool = False,
        delay: float = 0.0,
        skip: int = 0,
        times: int = 1,
    ) -> None:
        """Disturbs requests whose ``"METHOD path"`` contains ``match``: after ``skip`` matching ones pass, the next
        ``times`` wait ``delay`` seconds, then answer ``status`` (an error), or have their connection dropped once
        their body is read (``drop``), or are served normally (neither)."""
        self.faults.append(Fault(match, status, drop, delay, skip, times))

    def log(self, contains: str = "") -> list[str]:
        """``"METHOD path"`` of every request so far whose line contains ``contains``."""
        return [f"{r.method} {r.path}" for r in self.requests if contains in f"{r.method} {r.path}"]

    def plant(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Commits ``files`` directly, skipping every check (to serve hostile names such as ``../evil``)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=False))
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].files) if parent else {}
            tree.update({p: Entry(d, lfs=_is_lfs(p, len(d), self.lfs_threshold)) for p, d in files.items()})
            return self._new_commit(repo, branch, tree, "planted", parent)

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], message: str, parent: str | None) -> str:
        sha = hashlib.sha1(f"{parent}{message}{time.time_ns()}{sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, files, message, parent)
        repo.branches[branch] = sha
        return sha

    def _take_fault(self, line: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in line:
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    return fault
        return None


def _is_lfs(path: str, size: int, threshold: int) -> bool:
    return size > 0 and (size >= threshold or any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS))


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet: the requests are in hub.requests
        pass

    def setup(self) -> None:
        super().setup()
        self.hub.connections.add(self.connection)

    def finish(self) -> None:
        self.hub.connections.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        self._serve(self.command)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ plumbing
    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.requests.append(Request(method, self.path, headers, body))
        fault = self.hub._take_fault(f"{method} {self.path}")
        try:
            if fault is not None:
                time.sleep(fault.delay)
                if fault.drop:
                    raise Drop
                if fault.status is not None:
                    raise Reply(fault.status, "Injected failure")
            status, payload, headers = _route(self.hub, self, method, body)
        except Drop:
            self.close_connection = True
            self.connection.close()
            return
        except Reply as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            status, payload = e.status, {"error": e.message, **e.extra}
        self._send(method, status, payload, headers)

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    def require_token(self) -> None:
        token = self.token()
        if token is None:
            raise Reply(401, "You must be authenticated to write to this repository.")
        if token not in self.hub.tokens:
            raise Reply(401, "Invalid credentials in Authorization header")

    def origin(self) -> str:
        return f"http://{self.headers.get('Host', f'127.0.0.1:{self.hub.port}')}"


# ---------------------------------------------------------------------- routes
def _route(hub: HubServer, req: _Handler, method: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
    url = urllib.parse.urlsplit(req.path)
    path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
    if method == "POST" and path == "/api/repos/create":
        return _create_repo(hub, req, json.loads(body))
    if method == "POST" and path == "/api/validate-yaml":
        return _validate_yaml(json.loads(body))
    if path.startswith("/lfs/"):
        return _storage(hub, method, path.removeprefix("/lfs/"), body)
    if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
        repo_id = path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch")
        _repo(hub, req, repo_id, write=True)
        return _lfs_batch(hub, repo_id, json.loads(body))
    if method == "POST" and path.endswith(".git/info/lfs/objects/verify"):
        _repo(hub, req, path.removeprefix("/").removesuffix(".git/info/lfs/objects/verify"), write=True)
        oid = json.loads(body)["oid"]
        if oid not in hub.lfs_objects:
            raise Reply(404, f"LFS object {oid} was not uploaded.")
        return 200, {"success": True}, {}
    if path.startswith("/api/models/"):
        return _api(hub, req, method, url.path.removeprefix("/api/models/"), query, body)
    if "/resolve/" in url.path:
        repo_id, _, rest = url.path.removeprefix("/").partition("/resolve/")
        revision, _, file = rest.partition("/")
        return _resolve(hub, req, method, repo_id, urllib.parse.unquote(revision), urllib.parse.unquote(file))
    raise Reply(404, f"No route for {method} {path}")


def _repo(hub: HubServer, req: _Handler, repo_id: str, *, write: bool = False) -> Repo:
    repo = hub.repos.get(repo_id)
    if write:
        req.require_token()
    if repo is None or (repo.private and req.token() not in hub.tokens):
        raise Reply(401 if req.token() is None else 404, "Repository not found", "RepoNotFound")
    return repo


def _create_repo(hub: HubServer, req: _Handler, payload: dict) -> tuple[int, Any, dict]:
    req.require_token()
    repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
    url = f"{req.origin()}/{repo_id}"
    with hub.lock:
        if repo_id in hub.repos:
            raise Reply(409, "You already created this model repo", url=url)  # the client reads `url`
        repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        attributes = "\n".join(f"{p} filter=lfs diff=lfs merge=lfs -text" for p in LFS_PATTERNS) + "\n"
        hub._new_commit(repo, "main", {".gitattributes": Entry(attributes.encode(), lfs=False)}, "initial commit", None)
    return 200, {"url": url, "name": repo_id, "id": repo_id}, {}


def _validate_yaml(payload: dict) -> tuple[int, Any, dict]:
    content = payload.get("content", "")
    if content.startswith("---"):
        header = content.split("---", 2)[1]
        try:
            meta = yaml.safe_load(header)
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, {}
        if meta is not None and not isinstance(meta, dict):
            return 400, {"errors": [{"message": "The metadata must be a mapping."}], "warnings": []}, {}
    return 200, {"errors": [], "warnings": []}, {}


def _api(hub: HubServer, req: _Handler, method: str, rest: str, query: dict, body: bytes) -> tuple[int, Any, dict]:
    parts = [urllib.parse.unquote(p) for p in rest.split("/")]
    repo_id, action, args = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else ""), parts[3:]
    with hub.lock:
        repo = _repo(hub, req, repo_id, write=method == "POST" and action in ("preupload", "commit", "branch"))
        if method == "GET" and action in ("", "revision"):
            return 200, _info(repo_id, repo, repo.commit(args[0] if args else "main")), {}
        if method == "GET" and action == "refs":
            refs = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            return 200, {"branches": refs, "converts": [], "tags": [], "pullRequests": []}, {}
        if method == "GET" and action == "tree":
            recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
            return 200, _tree(repo.commit(args[0]), "/".join(args[1:]), recursive), {}
        if method == "POST" and action == "paths-info":
            form = urllib.parse.parse_qs(body.decode())
            wanted = {p.strip("/") for p in form.get("paths", [])}
            return 200, [e for e in _tree(repo.commit(args[0]), "", True) if e["path"] in wanted], {}
        if method == "POST" and action == "branch":
            return _create_branch(repo, args[0], json.loads(body or b"{}"))
        if method == "POST" and action == "preupload":
            return 200, _preupload(hub, repo.commit(args[0]), json.loads(body)), {}
        if method == "POST" and action == "commit":
            return _commit(hub, req, repo_id, repo, args[0], body)
    raise Reply(404, f"No route for {method} /api/models/{rest}")


def _info(repo_id: str, repo: Repo, commit: Commit) -> dict:
    siblings = [{"rfilename": p} for p in sorted(commit.files)]
    return {
        "id": repo_id,
        "modelId": repo_id,
        "sha": commit.sha,
        "private": repo.private,
        "siblings": siblings,
        "tags": [],
        "downloads": 0,
        "likes": 0,
    }


def _file_info(path: str, entry: Entry) -> dict:
    info = {"type": "file", "path": path, "size": len(entry.pointer if entry.lfs else entry.data), "oid": entry.oid}
    if entry.lfs:
        info["size"] = len(entry.data)
        info["lfs"] = {"oid": entry.sha256, "size": len(entry.data), "pointerSize": len(entry.pointer)}
    return info


def _tree(commit: Commit, under: str, recursive: bool) -> list[dict]:
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    out, folders = [], set()
    for path in sorted(commit.files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            out.append(_file_info(path, commit.files[path]))
    for folder in sorted(folders):
        if recursive or "/" not in folder[len(prefix) :]:
            out.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
    if prefix and not out:
        raise Reply(404, f"{under} does not exist", "EntryNotFound")
    return out


def _create_branch(repo: Repo, branch: str, payload: dict) -> tuple[int, Any, dict]:
    if branch in repo.branches:
        raise Reply(409, f"Reference refs/heads/{branch} already exists")
    repo.branches[branch] = repo.commit(payload.get("startingPoint") or "main").sha
    return 200, {}, {}


def _preupload(hub: HubServer, commit: Commit, payload: dict) -> dict:
    files = []
    for f in payload["files"]:
        lfs = _is_lfs(f["path"], f["size"], hub.lfs_threshold)
        existing = commit.files.get(f["path"])
        # The client compares this with its local oid (sha256 for LFS, git blob id otherwise) to skip unchanged files.
        oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
        files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return {"files": files, "commitOid": commit.sha}


def _lfs_batch(hub: HubServer, repo_id: str, payload: dict) -> tuple[int, Any, dict]:
    objects = []
    for obj in payload["objects"]:
        oid, size = obj["oid"], obj["size"]
        entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if oid not in hub.lfs_objects:
            entry["actions"] = {
                "upload": {"href": f"{hub.storage_url}/lfs/{oid}", "header": {}},
                "verify": {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
            }
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}


def _storage(hub: HubServer, method: str, rest: str, body: bytes) -> tuple[int, Any, dict]:
    oid = rest
    if method == "PUT":
        if hashlib.sha256(body).hexdigest() != oid:
            raise Reply(400, "The uploaded content does not match its sha256.")
        hub.lfs_objects[oid] = body
        return 200, b"", {"ETag": f'"{oid}"'}
    if method in ("GET", "HEAD") and oid in hub.lfs_objects:
        return 200, hub.lfs_objects[oid], {"Content-Type": "application/octet-stream"}
    raise Reply(404, f"No LFS object {oid}")


def _commit(hub: HubServer, req: _Handler, repo_id: str, repo: Repo, revision: str, body: bytes):
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    if revision not in repo.branches:
        raise Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    parent = repo.branches[revision]
    tree, header = dict(repo.commits[parent].files), {}
    for line in lines:
        key, value = line["key"], line["value"]
        if key == "header":
            header = value
            if value.get("parentCommit") not in (None, parent):
                raise Reply(412, "The parent commit is not the head of the branch.")
        elif key == "file":
            data = base64.b64decode(value["content"])
            tree[_safe(value["path"])] = Entry(data, lfs=False)
        elif key == "lfsFile":
            if value["oid"] not in hub.lfs_objects:
                raise Reply(422, f"LFS object {value['oid']} for {value['path']} was not uploaded.")
            tree[_safe(value["path"])] = Entry(hub.lfs_objects[value["oid"]], lfs=True)
        elif key == "deletedFile":
            if tree.pop(value["path"], None) is None:
                raise Reply(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            folder = value["path"].rstrip("/") + "/"
            tree = {p: e for p, e in tree.items() if not p.startswith(folder)}
    sha = hub._new_commit(repo, revision, tree, header.get("summary", ""), parent)
    return 200, {"commitUrl": f"{req.origin()}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}, {}


def _safe(path: str) -> str:
    if path.startswith("/") or ".." in path.split("/"):
        raise Reply(400, f"Invalid path {path!r}.")
    return path


def _resolve(hub: HubServer, req: _Handler, method: str, repo_id: str, revision: str, file: str):
    with hub.lock:
        commit = _repo(hub, req, repo_id).commit(revision)
        entry = commit.files.get(file)
    if entry is None:
        raise Reply(404, f"Entry not found: {file}", "EntryNotFound")
    headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.oid}"'}
    if entry.lfs:
        headers.update(
            {
                "Location": f"{hub.storage_url}/lfs/{entry.sha256}",
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(len(entry.data)),
            }
        )
        return 302, b"", headers
    return 200, entry.data, headers
