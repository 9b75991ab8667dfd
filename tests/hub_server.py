"""A small Hugging Face Hub-compatible HTTP server for tests: just what `push` and `pull` need.

The real `huggingface_hub` client talks to it through `endpoint=`/`HF_ENDPOINT`, so tests exercise
real HTTP requests, real NDJSON commits and real file downloads, offline. Repositories live in a temp
folder (`<root>/<owner>/<name>/<revision>/<path>`), so tests can assert exactly what was committed.
Test infrastructure, not a product: one user, models only, no LFS (every upload is "regular").
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass
class HubState:
    token: str
    user: str
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    #: path regex -> HTTP status to answer instead (for error tests)
    failures: dict[str, int] = field(default_factory=dict)

    def sha(self, repo_id: str, revision: str) -> str:
        files = self.repos[repo_id].branches[revision]
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        """A branch's files, by branch name or by its current commit sha."""
        branches = self.repos[repo_id].branches
        if revision in branches:
            return branches[revision]
        return next((files for name, files in branches.items() if self.sha(repo_id, name) == revision), None)


class Handler(BaseHTTPRequestHandler):
    state: HubState
    base_url: str
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args):  # keep test output clean
        pass

    # --- helpers ------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict | None = None, head: bool = False):
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(status)
        if isinstance(body, dict):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"error": message}, {"X-Error-Message": message})

    def _body(self) -> bytes:
        return self.request_body

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _route(self, method: str) -> None:
        # Read every body, used or not: with keep-alive, unread bytes would be parsed as the next request.
        self.request_body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = unquote(urlparse(self.path).path)
        self.state.requests.append((method, path, dict(self.headers)))
        for pattern, status in self.state.failures.items():
            if re.search(pattern, path):
                return self._error(status, f"injected failure {status}")
        for verb, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return handler(self, **match.groupdict())
        self._error(404, f"no route for {method} {path}")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # --- endpoints ----------------------------------------------------------------------------------
    def create_repo(self):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(self._body())
        owner = payload.get("organization") or self.state.user
        if owner != self.state.user:
            return self._error(403, f"You don't have the rights to create a model under the namespace {owner}")
        repo_id = f"{owner}/{payload['name']}"
        if repo_id in self.state.repos:
            return self._error(409, "You already created this model repo")
        self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id})

    def validate_yaml(self):
        import yaml

        content = json.loads(self._body()).get("content", "")
        if content.startswith("---"):  # a README: check its front matter, as the Hub does
            content = content.split("---", 2)[1]
        try:
            metadata = yaml.safe_load(content) or {}
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": str(e)}]})
        problems = [f"{key} must be a list of strings" for key in ("tags",)
                    if key in metadata and not all(isinstance(t, str) for t in metadata[key] or [])]
        if not isinstance(metadata, dict) or problems:
            return self._send(400, {"errors": [{"message": p} for p in problems or ["metadata must be a mapping"]]})
        self._send(200, {"errors": [], "warnings": []})

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or ((write or repo.private) and not self._authorized()):
            self._error(401 if not self._authorized() else 404, f"Repository not found: {repo_id}")
            return None
        return repo

    def preupload(self, repo_id: str, revision: str):
        if self._repo(repo_id, write=True) is None:
            return
        files = json.loads(self._body()).get("files", [])
        self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]})

    def commit(self, repo_id: str, revision: str):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        files = dict(repo.branches.setdefault(revision, {}))
        header = {}
        for line in lines:
            if line["key"] == "header":
                header = line["value"]
            elif line["key"] == "file":
                value = line["value"]
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
        repo.branches[revision] = files
        sha = self.state.sha(repo_id, revision)
        repo.commits.append({"revision": revision, "summary": header.get("summary"), "files": sorted(files), "sha": sha})
        self._send(200, {"commitUrl": f"{self.base_url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "commitMessage": header.get("summary", "")})

    def create_branch(self, repo_id: str, branch: str):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = dict(repo.branches["main"])
        self._send(200, {})

    def revision(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}")
        files = repo.branches[revision]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": self.state.sha(repo_id, revision),
                         "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(files)]})

    def tree(self, repo_id: str, revision: str, path: str | None = None):
        if self._repo(repo_id) is None:
            return
        files = self.state.files_at(repo_id, revision)
        if files is None:
            return self._error(404, f"Invalid rev id: {revision}")
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                   for name, data in sorted(files.items()) if name.startswith(prefix)]
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def resolve(self, repo_id: str, revision: str, path: str, head: bool = False):
        repo = self._repo(repo_id)
        if repo is None:
            return
        files = self.state.files_at(repo_id, revision)
        if files is None or path not in files:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
        data = files[path]
        branch = next(name for name, f in repo.branches.items() if f is files)
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": self.state.sha(repo_id, branch)}
        self._send(200, data, headers, head)

    def resolve_head(self, repo_id: str, revision: str, path: str):
        self.resolve(repo_id, revision, path, head=True)

    def whoami(self):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(200, {"name": self.state.user, "type": "user", "orgs": []})


REPO = r"(?P<repo_id>[^/]+/[^/]+)"
ROUTES = [
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", Handler.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", Handler.commit),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", Handler.create_branch),
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", Handler.revision),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", Handler.tree),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", Handler.resolve),
    ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", Handler.resolve_head),
    ("GET", r"/api/whoami-v2", Handler.whoami),
]


class FakeHub:
    """Start with `FakeHub(token, user)`; `.url` is the endpoint; `.close()` stops it."""

    def __init__(self, token: str = "hf_test_token_do_not_print", user: str = "tester"):
        self.state = HubState(token=token, user=user)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 64, "daemon_threads": True})
        self.server = server_class(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.base_url = self.url
        # A short poll interval: shutdown() waits for the next poll, 0.5 s by default, in every test's teardown.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.state.repos[repo_id].branches[revision]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def save(self, folder: Path) -> None:  # pragma: no cover - debugging aid
        for repo_id, repo in self.state.repos.items():
            for revision, files in repo.branches.items():
                for path, data in files.items():
                    target = folder / repo_id / revision / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
