"""A local stand-in for the few Hugging Face Hub HTTP endpoints a push uses, recording what it gets.

Endpoints: repo create, branch create, README metadata validation, preupload (every file is
"regular", so contents arrive base64 in the commit), commit (NDJSON), and revision info (used by
huggingface_hub when a commit would change nothing). `fail_commits = N` answers the next N commit
requests with HTTP 500 before recording anything, like a Hub failing midway through a push.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        self.requests: list[dict] = []  # method, path, authorization
        self.fail_commits = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, payload: dict):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _record(self):
                hub.requests.append({"method": self.command, "path": self.path,
                                     "authorization": self.headers.get("Authorization")})

            def do_GET(self):  # noqa: N802
                self._record()
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^?]+)", self.path)
                if m and m.group(1) in hub.repos:
                    head = next((c["oid"] for c in reversed(hub.commits) if c["repo_id"] == m.group(1)), "0" * 40)
                    return self._reply(200, {"id": m.group(1), "modelId": m.group(1), "sha": head,
                                             "private": hub.repos[m.group(1)]["private"],
                                             "siblings": [{"rfilename": p} for p in hub.files(m.group(1), m.group(2))]})
                return self._reply(404, {"error": "Repository not found"})

            def do_POST(self):  # noqa: N802
                self._record()
                body = self._body()
                with hub._lock:
                    if self.path.startswith("/api/repos/create"):
                        data = json.loads(body)
                        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                        if repo_id in hub.repos:
                            return self._reply(409, {"error": "You already created this model repo",
                                                     "url": f"{hub.endpoint}/{repo_id}"})
                        hub.repos[repo_id] = {"private": data.get("visibility") == "private" or bool(data.get("private")),
                                              "branches": {"main": {}}}
                        return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                    if self.path.startswith("/api/validate-yaml"):
                        return self._reply(200, {"errors": [], "warnings": []})
                    m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^?]+)", self.path)
                    if not m or m.group(1) not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    repo_id, action, rev = m.groups()
                    branches = hub.repos[repo_id]["branches"]
                    if action == "branch":
                        if rev in branches:
                            return self._reply(409, {"error": "Reference already exists"})
                        branches[rev] = dict(branches["main"])
                        return self._reply(200, {})
                    if rev not in branches:
                        return self._reply(404, {"error": f"Invalid rev id: {rev}"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        have = branches[rev]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                             "oid": git_blob_oid(have[f["path"]]) if f["path"] in have else None}
                            for f in files]})
                    # commit
                    if hub.fail_commits > 0:
                        hub.fail_commits -= 1
                        return self._reply(500, {"error": "Internal Error - We're working hard to fix this"})
                    header, added = None, {}
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            header = item["value"]
                        elif item["key"] == "file":
                            added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        else:
                            return self._reply(400, {"error": f"unsupported operation {item['key']}"})
                    branches[rev].update(added)
                    oid = hashlib.sha1(repr((len(hub.commits), sorted(added))).encode()).hexdigest()
                    hub.commits.append({"repo_id": repo_id, "revision": rev, "summary": header["summary"],
                                        "files": sorted(added), "oid": oid})
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})

        return Handler
