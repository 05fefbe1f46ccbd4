"""`vlora-hf push`: refusals (pickles, secrets, bad card, offline) and an upload to a local fake Hub server."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny import tiny_model

from vlora_hf.conversion.export import export_folder
from vlora_hf.conversion.push import main as push_main


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints HfApi(endpoint=...) uses for create_repo + upload_folder of small files (huggingface_hub 2.4):
    POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/branch/{b}, /api/models/{repo}/preupload/{rev},
    /api/models/{repo}/commit/{rev} (ndjson: header + base64 files)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        state["requests"].append(path)
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if path == "/api/repos/create":
            body = json.loads(raw)
            repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            state["repos"][repo] = body
            return self._reply(200, {"url": f"{endpoint}/{repo}"})
        if path == "/api/validate-yaml":
            state["validated"].append(json.loads(raw)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # ['', 'api', 'models', owner, name, action, revision]
        if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
            repo, action, revision = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if repo not in state["repos"]:
                return self._reply(404, {"error": f"Repository {repo} not found"})
            if action == "branch":
                state["branches"].append((repo, revision))
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(raw)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if action == "commit":
                lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                header = lines[0]["value"]
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
                oid = f"{len(state['commits']) + 1:040x}"
                state["commits"].append({"repo": repo, "revision": revision, "summary": header["summary"], "files": files})
                return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"unknown endpoint {path}"})


@pytest.fixture()
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.state = {"requests": [], "repos": {}, "validated": [], "branches": [], "commits": []}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server.state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_folder(tiny_model(seed=1), None, tmp_path_factory.mktemp("export") / "hub", base_model="lmsys/vicuna-7b-v1.5")


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_push_uploads_every_file_and_reports_the_commit_url(folder, hub, online, capsys):
    url, state = hub
    rc = push_main([str(folder), "alice/vlora-tiny", "--endpoint", url, "--private", "--commit-message", "first"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert state["repos"]["alice/vlora-tiny"]["visibility"] == "private"
    assert state["validated"] and state["validated"][0] == (folder / "README.md").read_text()
    [commit] = state["commits"]
    assert commit["summary"] == "first" and commit["revision"] == "main"
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert commit["files"] == local
    assert f"{url}/alice/vlora-tiny/commit/{1:040x}" in out.out
    assert "model.safetensors" in local and "modeling_vlora.py" in local


def test_push_to_a_branch(folder, hub, online, capsys):
    url, state = hub
    assert push_main([str(folder), "alice/vlora-tiny", "--endpoint", url, "--revision", "dev"]) == 0
    assert state["branches"] == [("alice/vlora-tiny", "dev")]
    assert state["commits"][0]["revision"] == "dev"


def test_push_uses_hf_endpoint(folder, hub, online, monkeypatch, capsys):
    url, state = hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    assert push_main([str(folder), "bob/model"]) == 0
    assert len(state["commits"]) == 1


@pytest.mark.parametrize("name, needle", [
    ("pytorch_model.bin", "pickle files ['pytorch_model.bin']"),
    ("training_state.pt", "pickle files ['training_state.pt']"),
    ("extra/optimizer.pkl", "pickle files ['extra/optimizer.pkl']"),
    (".env", "secret-looking files ['.env']"),
    ("token", "secret-looking files ['token']"),
    ("hf.token", "secret-looking files ['hf.token']"),
])
def test_push_refuses_pickles_and_secrets(folder, hub, online, tmp_path, capsys, name, needle):
    url, state = hub
    bad = copy_folder(folder, tmp_path / "bad")
    (bad / name).parent.mkdir(parents=True, exist_ok=True)
    (bad / name).write_bytes(b"x")
    assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
    err = capsys.readouterr().err
    assert needle in err and "refusing to upload" in err
    assert state["requests"] == []  # nothing was sent


def test_push_refuses_a_token_inside_a_text_file(folder, hub, online, tmp_path, capsys):
    url, state = hub
    bad = copy_folder(folder, tmp_path / "bad")
    (bad / "notes.txt").write_text("login with hf_" + "a1B2" * 9 + "\n")
    assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
    assert "notes.txt (holds a string that looks like a Hugging Face token)" in capsys.readouterr().err
    assert state["requests"] == []


def test_tokenizer_files_are_not_mistaken_for_secrets():
    from vlora_hf.conversion.push import is_secret_name

    for ok in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "README.md"):
        assert not is_secret_name(ok)
    for bad in (".env", ".env.local", "token", "HF_TOKEN", ".git-credentials", "id_rsa", "server.pem"):
        assert is_secret_name(bad)


def test_push_validates_the_card_metadata(folder, hub, online, tmp_path, capsys):
    url, state = hub
    bad = copy_folder(folder, tmp_path / "bad")
    card = (bad / "README.md").read_text().replace("pipeline_tag: image-text-to-text", "pipeline_tag: text-generation")
    (bad / "README.md").write_text(card)
    assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
    assert "pipeline_tag is 'text-generation', expected 'image-text-to-text'" in capsys.readouterr().err
    (bad / "README.md").unlink()
    assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
    assert "README.md is missing" in capsys.readouterr().err
    assert state["requests"] == []


def test_push_offline_is_a_clear_error(folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_main([str(folder), "alice/x", "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1 is set" in err and "unset HF_HUB_OFFLINE" in err


def test_offline_error_from_huggingface_hub_is_translated(folder, monkeypatch):
    """Even when our own check is bypassed, huggingface_hub's OfflineModeIsEnabled becomes the same message."""
    from vlora_hf.conversion import push

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    from huggingface_hub.errors import OfflineModeIsEnabled

    def refuse(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", refuse)
    with pytest.raises(push.PushError, match="HF_HUB_OFFLINE=1 is set"):
        push.push_folder(folder, "alice/x", endpoint="http://127.0.0.1:9")


def test_push_cli_help():
    from vlora_hf.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["push", "--help"])
    assert exc.value.code == 0
