"""Hub ids: the Hugging Face cache layout, and downloads from a local server that speaks the hub's URL layout
(file list with sizes, resolve URLs redirected to a "CDN", Range requests, connections dropped mid-file)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import hub
import interleave
from helpers import golden_path, write_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The hub on 127.0.0.1 (never anything else): /api/models/{repo}/revision/main, /{repo}/resolve/{rev}/{file}
    (302 to /cdn/... for .safetensors files, as the hub sends large files to its CDN). drops[name] = n: the next n
    requests for that file get half of what they ask for, then the connection drops. `lie` inflates listed sizes."""

    def __init__(self, repos):
        self.repos, self.requests, self.drops, self.lie = repos, [], {}, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append((self.path, self.headers.get("Range")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and parts[4:] == ["revision", "main"]:
                    folder = fake.repos.get("/".join(parts[2:4]))
                    if folder is None:   # the real hub answers 401 for a repo that does not exist
                        return self.send_error(401, "Repository Not Found")
                    files = [{"rfilename": f, "size": os.path.getsize(os.path.join(folder, f)) + fake.lie}
                             for f in sorted(os.listdir(folder))]
                    return self.reply(200, json.dumps({"sha": COMMIT, "siblings": files}).encode())
                if len(parts) == 5 and parts[2] == "resolve":   # /{org}/{name}/resolve/{rev}/{file}
                    repo, name = "/".join(parts[:2]), parts[4]
                    if name.endswith(".safetensors"):
                        self.send_response(302)
                        self.send_header("Location", f"/cdn/{repo}/{name}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                elif len(parts) == 4 and parts[0] == "cdn":     # /cdn/{org}/{name}/{file}
                    repo, name = "/".join(parts[1:3]), parts[3]
                else:
                    return self.send_error(404)
                folder = fake.repos.get(repo)
                if not folder or not os.path.isfile(os.path.join(folder, name)):
                    return self.send_error(404)
                data = open(os.path.join(folder, name), "rb").read()
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                self.reply(206 if start else 200, data[start:], cut=fake.drops.get(name, 0) > 0)
                fake.drops[name] = fake.drops.get(name, 0) - 1

            def reply(self, status, body, cut=False):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if cut else body)
                self.close_connection = cut or self.close_connection

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ranges(self):
        return [r for _, r in self.requests if r]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("repos")
    folders = {}
    for name, source in (("single", ("tied", "hf")), ("sharded", ("untied", "hf_new"))):
        folders[f"tiny-org/{name}"] = str(shutil.copytree(golden_path(*source), base / name))
        write_tiny_tokenizer(folders[f"tiny-org/{name}"])
    return folders


@pytest.fixture
def fake(repos, tmp_path, monkeypatch):
    server = FakeHub(repos)
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.server.shutdown()


def snapshot_dir(tmp_path, repo="tiny-org/sharded"):
    return tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT


def cli(*args):
    """sample.py in a subprocess with this process's environment (HF_HOME and HF_ENDPOINT set by the fixture)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_download_lands_in_the_hf_cache_layout_and_is_found_there_offline(fake, repos, tmp_path, monkeypatch):
    folder = hub.snapshot("tiny-org/sharded")
    assert folder == str(snapshot_dir(tmp_path))
    assert sorted(os.listdir(folder)) == sorted(os.listdir(repos["tiny-org/sharded"]))   # all of them are needed
    for name in os.listdir(folder):
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(repos["tiny-org/sharded"], name),
                                                                     "rb").read()
    refs = tmp_path / "hf" / "hub" / "models--tiny-org--sharded" / "refs" / "main"
    assert refs.read_text() == COMMIT
    n = len(fake.requests)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing listens there: the cache must suffice
    model = interleave.load("tiny-org/sharded")               # the loader takes hub ids too
    assert len(fake.requests) == n and model.config.text.vocab == 320


def test_a_dropped_connection_is_resumed_with_a_range_request(fake, repos):
    fake.drops = {"model.safetensors": 1}
    folder = hub.snapshot("tiny-org/single")
    size = os.path.getsize(os.path.join(repos["tiny-org/single"], "model.safetensors"))
    assert fake.ranges() == [f"bytes={size // 2}-"] * 2   # the resolve URL, then the CDN it redirects to
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == \
        open(os.path.join(repos["tiny-org/single"], "model.safetensors"), "rb").read()
    assert not [f for f in os.listdir(folder) if f.endswith(".incomplete")]


def test_wrong_sizes_are_refused_and_nothing_is_renamed(fake, tmp_path):
    fake.lie = 7
    with pytest.raises(interleave.CheckpointError, match=r"download of config.json stopped .*run again"):
        hub.snapshot("tiny-org/single")
    assert os.listdir(snapshot_dir(tmp_path, "tiny-org/single")) == ["config.json.incomplete"]


def test_unknown_ids_offline_and_hf_hub_offline_say_what_to_do(fake, monkeypatch):
    with pytest.raises(interleave.CheckpointError, match="neither a local folder nor a model on .*HTTP 401"):
        hub.snapshot("tiny-org/nothing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(interleave.CheckpointError, match="HF_HUB_OFFLINE.*pass the folder's path"):
        hub.snapshot("tiny-org/single")
    assert hub.local_path(golden_path("tied", "hf")) == golden_path("tied", "hf")   # a folder is not a hub id


def test_cli_interrupted_download_then_resumed(fake, repos, tmp_path):
    fake.drops = {"config.json": 100}   # every request is cut: three tries, then a clear message
    image = golden_path("anyres", "images", "tiny_30x20.png")
    result = cli("--model", "tiny-org/sharded", "--image", image, "What is it?", "--max-new-tokens", "4")
    assert_one_line_error(result, "download of config.json stopped", "run again to resume")
    assert os.listdir(snapshot_dir(tmp_path)) == ["config.json.incomplete"]   # nothing under a final name
    partial = os.path.getsize(snapshot_dir(tmp_path) / "config.json.incomplete")
    fake.drops, fake.requests = {}, []
    result = cli("--model", "tiny-org/sharded", "--image", image, "What is it?", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert fake.ranges() == [f"bytes={partial}-"] and "image slots: tiny_30x20.png 64" in result.stderr
    assert "defaults from generation_config.json" in result.stderr


def test_cli_unknown_hub_id_and_no_network(fake, monkeypatch):
    assert_one_line_error(cli("--model", "tiny-org/nothing", "hello"), "tiny-org/nothing is neither a local folder")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert_one_line_error(cli("--model", "tiny-org/single", "hello"), "cannot download tiny-org/single",
                          "pass the folder's path")
