"""A minimal Hugging Face Hub on 127.0.0.1 for publish-then-load tests (standard library only).

It implements the endpoints that `create_repo`, `upload_folder` / `push_to_hub` and `from_pretrained` /
`snapshot_download` call, with every file uploaded as a regular (non-LFS) blob; clients must set
HF_HUB_DISABLE_XET=1. No package on the registries ships a writable Hub server, hence this one.
"""

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


REPO = r"(?P<repo>[^/]+/[^/]+)"


class _Repo:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.sha = hashlib.sha1(b"empty").hexdigest()


def validate_card_metadata(content: str) -> list[str]:
    """The metadata checks a model repo's README gets: YAML front matter that parses, known value types, and a
    `model-index` that huggingface_hub's own parser accepts."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    errors = []
    try:
        data = ModelCard(content, ignore_metadata_errors=False).data.to_dict()
    except Exception as err:  # malformed YAML or metadata
        return [f"metadata does not parse: {err}"]
    for key in ("tags", "datasets", "base_model"):
        if key in data and not isinstance(data[key], (list, str)):
            errors.append(f"{key} must be a string or a list of strings")
    if "model-index" in data:
        try:
            model_index_to_eval_results(data["model-index"])
        except Exception as err:
            errors.append(f"model-index is invalid: {err}")
    return errors


class HubHandler(BaseHTTPRequestHandler):
    repos: dict[str, _Repo]  # set on the server's handler subclass

    def log_message(self, *args):  # keep test output quiet
        pass

    # --- helpers --------------------------------------------------------------------------------------------------
    def _send(self, status, body=b"", content_type="application/json", headers=None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code, message):
        self._send(status, {"error": message}, headers={"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo_id):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _info(self, repo_id, repo):
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "tags": [],
            "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(repo.files.items())],
        }

    # --- routes ---------------------------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._send(
                200, {"name": "tester", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
            )
        if m := re.fullmatch(rf"/api/models/{REPO}(?:/revision/[^/]+)?", path):
            if repo := self._repo(m["repo"]):
                self._send(200, self._info(m["repo"], repo))
            return None
        if m := re.fullmatch(rf"/api/models/{REPO}/tree/[^/]+(?:/(?P<dir>.*))?", path):
            if repo := self._repo(m["repo"]):
                prefix = (m["dir"] or "").strip("/")
                entries = [
                    {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                    for p, c in sorted(repo.files.items())
                    if not prefix or p.startswith(prefix + "/")
                ]
                self._send(200, entries)
            return None
        if m := re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", path):
            repo = self.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {m['repo']} not found")
            content = repo.files.get(m["file"])
            if content is None:
                return self._error(404, "EntryNotFound", f"{m['file']} not found")
            etag = '"' + hashlib.sha256(content).hexdigest() + '"'
            return self._send(200, content, "application/octet-stream", {"X-Repo-Commit": repo.sha, "ETag": etag})
        return self._error(404, "NotFound", f"GET {path} is not implemented by the test hub")

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
            if repo_id in self.repos:
                return self._error(409, "RepoExists", "You already created this model repo")
            self.repos[repo_id] = _Repo()
            return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            errors = validate_card_metadata(json.loads(body)["content"])
            return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
        if m := re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path):
            if self._repo(m["repo"]):
                files = json.loads(body)["files"]
                self._send(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            return None
        if m := re.fullmatch(rf"/api/models/{REPO}/paths-info/[^/]+", path):
            if repo := self._repo(m["repo"]):
                wanted = re.findall(r"paths=([^&]+)", body.decode()) or json.loads(body or b"{}").get("paths", [])
                wanted = [unquote(p) for p in wanted]
                self._send(
                    200, [{"type": "file", "path": p, "size": len(repo.files[p])} for p in wanted if p in repo.files]
                )
            return None
        if m := re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path):
            repo = self._repo(m["repo"])
            if repo is None:
                return None
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return self._error(400, "Unsupported", f"commit operation {item['key']} is not supported")
            repo.sha = hashlib.sha1(
                repr(sorted((p, hashlib.sha1(c).hexdigest()) for p, c in repo.files.items())).encode()
            ).hexdigest()
            url = f"http://{self.headers['Host']}/{m['repo']}/commit/{repo.sha}"
            return self._send(200, {"commitUrl": url, "commitOid": repo.sha, "pullRequestUrl": None})
        return self._error(404, "NotFound", f"POST {path} is not implemented by the test hub")


class LocalHub:
    """`with LocalHub() as hub:` serves on 127.0.0.1 at `hub.endpoint` until the block ends."""

    def __enter__(self):
        handler = type("Handler", (HubHandler,), {"repos": {}})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.repos = handler.repos
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def client_env(self, hf_home, token: str | None = "hf_dummy_test_token", **extra) -> dict:
        """The environment of a subprocess whose huggingface_hub talks to this hub (online, no Xet), with its own
        cache in `hf_home`; `token=None` for an anonymous client."""
        env = {**os.environ, "HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        env.update(HF_HOME=str(hf_home), **({"HF_TOKEN": token} if token else {}), **extra)
        return env
