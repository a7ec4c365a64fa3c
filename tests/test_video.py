"""Video files through PyAV: MP4, WebM, MOV, MKV and AVI written here by PyAV (a square moving 4 pixels a frame, so
each decoded frame tells its own index), sampled as the release samples; every kind of bad file is one line; and an
MP4 question on the embedded model answers as its GIF twin does."""
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest

import interleave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, WIDTH, HEIGHT, SIDE, STEP = 30, 160, 48, 16, 4
# np.linspace(0, 29, 8) truncated: the frames the release's uniform sampling takes from 30
EIGHT_OF_THIRTY = [0, 4, 8, 12, 16, 20, 24, 29]


def moving_square(index):
    """Frame `index`: a white square on black whose left edge is at x = STEP * index."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[16:16 + SIDE, STEP * index:STEP * index + SIDE] = 255
    return pixels


def write_video(path, codec, frames, pix_fmt="yuv420p", options=None, container_options=None):
    """Encode the frames (H x W x 3 uint8 arrays) at 25 fps with PyAV."""
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=25, options=options or {})
        stream.width = frames[0].shape[1]
        stream.height = frames[0].shape[0]
        stream.pix_fmt = pix_fmt
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def square_position(image):
    """The left edge of the bright square, from the column centroid of bright pixels."""
    bright = np.asarray(image.convert("L"), dtype=np.float64)[16:16 + SIDE] > 128
    columns = np.nonzero(bright.any(axis=0))[0]
    return (columns.min() + columns.max() + 1) / 2 - SIDE / 2


CONTAINERS = [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("mov", "mpeg4"), ("mkv", "mpeg4"), ("avi", "mpeg4")]


@pytest.mark.parametrize("extension,codec", CONTAINERS)
def test_sampled_frames_are_the_expected_ones(tmp_path, extension, codec):
    path = write_video(tmp_path / f"clip.{extension}", codec, [moving_square(i) for i in range(FRAMES)])
    frames = interleave.read_video_frames(path, 8)
    assert len(frames) == 8 and frames[0].size == (WIDTH, HEIGHT) and frames[0].mode == "RGB"
    positions = [square_position(frame) for frame in frames]
    assert np.allclose(positions, [STEP * i for i in EIGHT_OF_THIRTY], atol=1.0), positions
    # more frames asked for than there are: every frame, in order
    everything = interleave.read_video_frames(path, 64)
    assert np.allclose([square_position(f) for f in everything], [STEP * i for i in range(FRAMES)], atol=1.0)


def test_webm_and_mkv_have_no_frame_count_and_are_counted_by_decoding(tmp_path):
    for extension, codec in (("webm", "libvpx-vp9"), ("mkv", "mpeg4")):
        path = write_video(tmp_path / f"clip.{extension}", codec, [moving_square(i) for i in range(FRAMES)])
        with av.open(path) as container:
            assert container.streams.video[0].frames == 0   # so the test above went through the count
        assert len(interleave.read_video_frames(path, 16)) == 16


def test_frames_beyond_the_context_are_refused_before_any_is_kept(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", "libx264", [moving_square(i) for i in range(FRAMES)])
    calls = []
    real = interleave.decode_video

    def recording(path, name, keep):
        calls.append(list(keep))
        return real(path, name, keep)
    monkeypatch.setattr(interleave, "decode_video", recording)
    with pytest.raises(interleave.InputError, match=r"clip.mp4 gives 16 frames, more than the 8 that fit"):
        interleave.read_video_frames(path, 16, max_frames=8)
    assert calls == []
    assert len(interleave.read_video_frames(path, 8, max_frames=8)) == 8
    assert calls == [EIGHT_OF_THIRTY]


def bad_videos(folder):
    """(file, what the one line must say) for each kind of bad video."""
    random_bytes = folder / "random.mp4"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    # MP4 keeps its index at the end unless "faststart" moves it to the front: cut both kinds in half
    noise = [np.random.default_rng(i).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for i in range(FRAMES)]
    back = write_video(folder / "back.mp4", "libx264", noise)
    cut_mp4 = folder / "cut.mp4"
    cut_mp4.write_bytes(open(back, "rb").read()[:os.path.getsize(back) // 2])
    front = write_video(folder / "front.mp4", "libx264", noise, container_options={"movflags": "faststart"})
    cut_front = folder / "cut_front.mp4"
    cut_front.write_bytes(open(front, "rb").read()[:os.path.getsize(front) // 2])
    webm = write_video(folder / "whole.webm", "libvpx-vp9", noise)
    cut_webm = folder / "cut.webm"
    cut_webm.write_bytes(open(webm, "rb").read()[:os.path.getsize(webm) // 2])
    # an audio track only
    audio = str(folder / "audio.mkv")
    with av.open(audio, "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    # a video stream without a single frame (AVI keeps such a stream; MP4 and Matroska drop it)
    empty = str(folder / "empty.avi")
    with av.open(empty, "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height = 64, 48
        out.start_encoding()
    # a codec FFmpeg does not know: the AVI's codec tag FMP4 renamed
    unknown = folder / "unknown.avi"
    avi = write_video(folder / "known.avi", "mpeg4", [moving_square(i) for i in range(FRAMES)])
    unknown.write_bytes(open(avi, "rb").read().replace(b"FMP4", b"ZZZZ"))
    return [(random_bytes, "cannot read .*random.mp4 as a video"),
            (cut_mp4, "cannot read .*cut.mp4 as a video"),
            # (PyAV 18 decodes the frames that are there; PyAV 14 fails on the cut one)
            (cut_front, r"cut_front.mp4 ends after \d+ frames though its header says 30; is the file truncated"
                        r"|cannot decode frame \d+ of .*cut_front.mp4 \(.*\); is the file complete"),
            (cut_webm, r"cut.webm ends early, after \d+ frames: the file is truncated"),
            (audio, r"audio.mkv has no video stream \(its streams: audio\)"),
            (empty, "empty.avi has a video stream without any frame"),
            (unknown, "unknown.avi: its video codec cannot be decoded"),
            (folder / "missing.mp4", "missing.mp4 does not exist")]


def test_each_bad_video_is_one_clear_line(tmp_path):
    for path, message in bad_videos(tmp_path):
        with pytest.raises(interleave.InputError, match=message):
            interleave.read_video_frames(path, 8)


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_bad_videos_exit_2_with_one_line(tmp_path):
    for path, message in bad_videos(tmp_path)[::3]:   # three kinds are enough here: each process loads torch
        result = sample("--video", path, "What happens?")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and re.match(f"error: .*({message})", result.stderr), result.stderr


def test_an_mp4_question_answers_as_its_gif_twin(tmp_path):
    """The embedded model's video task (data/make_m4.py): the same 8 frames as a GIF and as a lossless MP4."""
    from data import make_m4
    frames, question, expected = make_m4.make_example("video", seed=0, split="val", index=0)[:3]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    write_video(tmp_path / "clip.mp4", "libx264rgb", [np.asarray(f) for f in frames], pix_fmt="rgb24",
                options={"qp": "0"})
    mp4 = interleave.read_video_frames(str(tmp_path / "clip.mp4"), 8)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mp4, frames))   # lossless
    prompt = question.replace("<image>", "").strip()
    answers = {}
    for name in ("clip.gif", "clip.mp4"):
        result = sample("--video", tmp_path / name, "--num-frames", 4, prompt)
        assert result.returncode == 0, result.stderr
        answers[name] = result.stdout.strip()
    assert answers["clip.mp4"] == answers["clip.gif"] == expected
