"""Images and videos by http(s) URL, fetched with the standard library from a server on 127.0.0.1 (never anything
else): they load, redirects are followed, and a timeout, an HTTP error or a body over the size cap is one line."""
import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import interleave
from test_video import EIGHT_OF_THIRTY, FRAMES, STEP, moving_square, square_position, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 1 << 20   # the size cap the tests set


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass   # the client hung up on /slow or /trickle, as it should


class Files:
    """A server on 127.0.0.1: /NAME serves files[NAME]; /redirect/NAME sends a 302 to /NAME; /slow waits 3 s before
    answering; /trickle sends one byte every 0.2 s; /big-unsized sends 2 MiB without a Content-Length."""

    def __init__(self, files):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                if name.startswith("redirect/"):
                    self.send_response(302)
                    self.send_header("Location", "/" + name[len("redirect/"):])
                    self.end_headers()
                elif name == "slow":
                    time.sleep(3)
                    self.send_error(500)
                elif name == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    for _ in range(15):   # 3 s in all, then the server gives up
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                elif name == "big-unsized":   # HTTP/1.0: the body ends when the connection closes
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(32):
                        self.wfile.write(bytes(1 << 16))
                elif name in files:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(files[name])))
                    self.end_headers()
                    self.wfile.write(files[name])
                else:
                    self.send_error(404)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def png(width, height):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    mp4 = write_video(folder / "clip.mp4", "libx264", [moving_square(i) for i in range(FRAMES)])
    squares = [Image.fromarray(moving_square(i)) for i in range(FRAMES)]
    squares[0].save(folder / "clip.gif", save_all=True, append_images=squares[1:], duration=40)
    files = {"photo.png": png(30, 20), "clip.mp4": open(mp4, "rb").read(),
             "clip.gif": open(folder / "clip.gif", "rb").read(), "big.png": bytes(2 * CAP)}
    files["not-an-image.png"] = b"<html>a login page</html>"
    served = Files(files)
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setattr(interleave, "URL_TIMEOUT", 0.5)
    monkeypatch.setattr(interleave, "IMAGE_URL_MAX_BYTES", CAP)
    monkeypatch.setattr(interleave, "VIDEO_URL_MAX_BYTES", CAP)


def test_images_and_videos_load_by_url(server, limits):
    image = interleave.open_image(f"{server.url}/photo.png")
    assert image.size == (30, 20) and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(png(30, 20)))))
    assert interleave.open_image(f"{server.url}/redirect/photo.png").size == (30, 20)
    expected = [STEP * i for i in EIGHT_OF_THIRTY]
    for name in ("clip.mp4", "redirect/clip.mp4", "clip.gif"):
        frames = interleave.read_video_frames(f"{server.url}/{name}", 8)
        assert np.allclose([square_position(f) for f in frames], expected, atol=1.0), name


@pytest.mark.parametrize("name,message", [
    ("slow", r"/slow did not arrive within 0.5 s"),
    ("trickle", r"/trickle did not arrive within 0.5 s"),
    ("missing.png", r"/missing.png answered HTTP 404"),
    ("big.png", r"/big.png is larger than 1 MiB; download it and give the file"),
    ("big-unsized", r"/big-unsized is larger than 1 MiB"),
    ("not-an-image.png", r"cannot read .*/not-an-image.png as an image"),
])
def test_each_failing_url_is_one_line(server, limits, name, message):
    started = time.monotonic()
    with pytest.raises(interleave.InputError, match=message) as error:
        interleave.open_image(f"{server.url}/{name}")
    assert "\n" not in str(error.value) and time.monotonic() - started < 2.5


def test_a_refused_connection_and_a_video_over_the_cap_are_one_line(server, limits, monkeypatch):
    with pytest.raises(interleave.InputError, match=r"cannot fetch http://127.0.0.1:9/a.png \(.*\); check the"):
        interleave.open_image("http://127.0.0.1:9/a.png")
    monkeypatch.setattr(interleave, "VIDEO_URL_MAX_BYTES", 1000)
    with pytest.raises(interleave.InputError, match=r"/clip.mp4 is larger than .* MiB; download it"):
        interleave.read_video_frames(f"{server.url}/clip.mp4", 8)


def run(*args):
    """sample.py in a fresh process."""
    return subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT)


def test_cli_takes_an_image_url(server):
    result = run("--image", f"{server.url}/photo.png", "What is it?", "--max-new-tokens", "2")
    assert result.returncode == 0 and "image slots: photo.png" in result.stderr, result.stderr
    result = run("--image", f"{server.url}/missing.png", "What is it?")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "HTTP 404" in result.stderr, result.stderr
