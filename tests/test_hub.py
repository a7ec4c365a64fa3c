"""Checkpoints by hub id, through huggingface_hub, against a local server on 127.0.0.1 that answers the
endpoints huggingface_hub calls (HF_ENDPOINT points at it): the download, only the files the model needs, the
Hugging Face cache layout, HF_HUB_OFFLINE, and one clear line for each way it fails.

huggingface_hub reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so every case runs in a fresh
process with its own environment."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import interleave
from helpers import golden_path, write_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json",
          "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}
UNNEEDED = {"README.md", "pytorch_model.bin", "onnx.json"}   # in the repository, never to be fetched


class FakeHub:
    """The hub's endpoints as huggingface_hub calls them, for the repositories in `repos` (id -> folder):
    GET /api/models/{id}/revision/{rev} (the commit), GET /api/models/{id}/tree/{rev} (the files, sizes, ids),
    HEAD and GET /{id}/resolve/{rev}/{file}. An unknown repository gets 401 RepoNotFound, as from the real hub.
    `cut_files`: names whose body is cut in half, the connection then closed (every try)."""

    def __init__(self, repos):
        self.repos, self.requests, self.cut_files = repos, [], set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body):
                fake.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    folder = fake.repos.get("/".join(parts[2:4]))
                    if folder is None:
                        return self.reply(401, b'{"error": "Repository not found"}', send_body,
                                          {"X-Error-Code": "RepoNotFound"})
                    names = sorted(os.listdir(folder))
                    if parts[4] == "revision":
                        info = {"id": "/".join(parts[2:4]), "sha": COMMIT, "siblings": [{"rfilename": n} for n in names]}
                        return self.reply(200, json.dumps(info).encode(), send_body)
                    if parts[4] == "tree":
                        tree = [{"type": "file", "path": n, "size": os.path.getsize(os.path.join(folder, n)),
                                 "oid": blob_id(os.path.join(folder, n))} for n in names]
                        return self.reply(200, json.dumps(tree).encode(), send_body)
                if len(parts) == 5 and parts[2] == "resolve":   # /{org}/{name}/resolve/{rev}/{file}
                    folder, name = fake.repos.get("/".join(parts[:2])), parts[4]
                    if folder and os.path.isfile(os.path.join(folder, name)):
                        data = open(os.path.join(folder, name), "rb").read()
                        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{blob_id(os.path.join(folder, name))}"'}
                        return self.reply(200, data, send_body, headers, cut=name in fake.cut_files)
                self.reply(404, b"not found", send_body, {"X-Error-Code": "EntryNotFound"})

            def reply(self, status, body, send_body, headers=None, cut=False):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body[:len(body) // 2] if cut else body)
                self.close_connection = cut

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fetched(self):
        """The file names that were asked for by a resolve URL."""
        return {path.split("/")[-1] for _, path in self.requests if "/resolve/" in path}


def blob_id(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Two repositories: one single-file checkpoint, one sharded with a generation_config.json; both with a
    tokenizer and files the model does not need."""
    base = tmp_path_factory.mktemp("repos")
    folders = {}
    for name, source in (("single", ("tied", "hf")), ("sharded", ("untied", "hf_new"))):
        folder = str(shutil.copytree(golden_path(*source), base / name))
        write_tiny_tokenizer(folder)
        for extra in UNNEEDED:
            with open(os.path.join(folder, extra), "w") as f:
                f.write("not for the model")
        folders[f"tiny-org/{name}"] = folder
    return folders


@pytest.fixture
def hub(repos, tmp_path):
    server = FakeHub(repos)
    server.env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": server.url,
                  "PYTHONIOENCODING": "utf-8", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        server.env.pop(name, None)
    yield server
    server.server.shutdown()
    server.server.server_close()


def snapshot_dir(tmp_path, repo):
    return tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT


def run(env, *args, script=None):
    """sample.py (or a Python snippet) in a fresh process with env."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "sample.py", *args]
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT,
                          env=env)


LOAD = """import sys, interleave
model = interleave.load(sys.argv[1])
print(interleave.checkpoint_folder(sys.argv[1]))
print(model.config.text.vocab)"""


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_an_id_downloads_only_what_the_model_needs_then_loads_offline(hub, repos, tmp_path):
    result = run(hub.env, "tiny-org/sharded", script=LOAD)
    assert result.returncode == 0, result.stderr
    folder, vocab = result.stdout.split()
    assert folder == str(snapshot_dir(tmp_path, "tiny-org/sharded")) and vocab == "320"
    assert set(os.listdir(folder)) == NEEDED and hub.fetched() == NEEDED   # no README, no .bin
    for name in NEEDED:   # huggingface_hub's layout: links into blobs/, the same bytes
        with open(os.path.join(folder, name), "rb") as ours, open(os.path.join(repos["tiny-org/sharded"], name),
                                                                  "rb") as theirs:
            assert ours.read() == theirs.read()
    # Offline, and with nothing listening at the endpoint: the cache alone
    seen = len(hub.requests)
    offline = {**hub.env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run(offline, "tiny-org/sharded", script=LOAD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [folder, "320"] and len(hub.requests) == seen


def test_cli_by_id_then_offline_gives_the_same_answer(hub, tmp_path):
    image = golden_path("anyres", "images", "tiny_30x20.png")
    args = ("--model", "tiny-org/single", "--image", image, "What is it?", "--max-new-tokens", "4")
    online = run(hub.env, *args)
    assert online.returncode == 0, online.stderr
    assert "loaded tiny-org/single" in online.stderr and "image slots: tiny_30x20.png 64" in online.stderr
    offline = run({**hub.env, "HF_HUB_OFFLINE": "1"}, *args)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout
    assert "defaults from generation_config.json" in run(hub.env, "--model", "tiny-org/sharded", *args[2:]).stderr


def test_an_uncached_id_offline_is_one_line_naming_the_id_the_cache_and_the_ways_out(hub, tmp_path):
    result = run({**hub.env, "HF_HUB_OFFLINE": "1"}, "--model", "tiny-org/single", "hello")
    assert_one_line_error(result, "tiny-org/single is not in the Hugging Face cache", str(tmp_path / "hf" / "hub"),
                          "HF_HUB_OFFLINE is set", "HF_ENDPOINT", "local checkpoint folder")
    assert hub.requests == []
    result = run({**hub.env, "HF_ENDPOINT": "http://127.0.0.1:9"}, "--model", "tiny-org/single", "hello")
    assert_one_line_error(result, "tiny-org/single is not in the Hugging Face cache",
                          "http://127.0.0.1:9 is unreachable", "HF_ENDPOINT")


def test_an_unknown_id_and_a_download_cut_short_are_one_line(hub, tmp_path):
    result = run(hub.env, "--model", "tiny-org/nothing", "hello")
    assert_one_line_error(result, f"tiny-org/nothing is neither a local folder nor a model on {hub.url}")
    hub.cut_files = {"model.safetensors"}   # every try gets half of it: huggingface_hub retries, then gives up
    result = run(hub.env, "--model", "tiny-org/single", "hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"^error: downloading tiny-org/single from .* stopped .*run again to resume$",
                     result.stderr, re.MULTILINE), result.stderr
    hub.cut_files = set()
    assert run(hub.env, "--model", "tiny-org/single", "hello", "--max-new-tokens", "2").returncode == 0


def test_a_local_folder_wins_over_an_id(hub, repos, tmp_path, monkeypatch):
    shutil.copytree(repos["tiny-org/single"], tmp_path / "tiny-org" / "single")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # importing it now would fail
    assert interleave.checkpoint_folder("tiny-org/single") == "tiny-org/single"
    assert interleave.load("tiny-org/single").config.text.vocab == 320
    assert interleave.checkpoint_folder(golden_path("tied", "hf")) == golden_path("tied", "hf")
    assert hub.requests == []


def test_hub_py_is_gone_and_nothing_imports_it():
    assert not os.path.exists(os.path.join(ROOT, "hub.py"))
    for folder, _, names in os.walk(ROOT):
        if ".venv" in folder or ".git" in folder:
            continue
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    assert not re.search(r"^\s*(import hub\b|from hub import)", f.read(), re.MULTILINE), name
