"""Benchmark: interleave.read_video_frames on a long video, a 10-minute 720p H.264 MP4, down to 16 frames.

    python benchmarks/video_frames.py [--dir /tmp] [--minutes 10] [--frames 16]

Writes the video once with PyAV (libx264 preset "veryfast", 30 fps, a moving pattern and a moving square: 33 MiB,
about 5 minutes of encoding on 2 cores) and a copy of it remuxed into Matroska, whose header has no frame count, so
read_video_frames first counts the frames by decoding them. Then, in a fresh process for each file,
it reads the frames with read_video_frames and prints the time, the resident memory before the call, and the peak
during it (VmHWM, reset before the call), against what all the frames would take as RGB.
Not a test: the numbers go in the README.
"""
import argparse
import os
import subprocess
import sys
import time

import av
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT, FPS = 1280, 720, 30


def write_video(path, minutes):
    """A 720p H.264 MP4 of `minutes` minutes: a drifting colour pattern and a red square moving across it."""
    xs = np.arange(WIDTH, dtype=np.float32)
    ys = np.arange(HEIGHT, dtype=np.float32)
    frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)   # (H, W, RGB)
    with av.open(path + ".tmp.mp4", "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "veryfast"})
        stream.width = WIDTH
        stream.height = HEIGHT
        stream.pix_fmt = "yuv420p"
        for i in range(round(minutes * 60 * FPS)):
            row = np.sin((xs + 7 * i) / 60) * 60                 # (W,)
            column = np.cos((ys - 3 * i) / 45) * 60 + 128        # (H,)
            pattern = (column[:, None] + row[None, :]).astype(np.uint8)   # (H, W)
            frame[..., 0] = pattern
            frame[..., 1] = 255 - pattern
            frame[..., 2] = pattern // 2
            left = (13 * i) % (WIDTH - 100)
            frame[300:400, left:left + 100] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(path + ".tmp.mp4", path)


def remux(source, path):
    """The same packets in another container (no re-encoding)."""
    with av.open(source) as inp, av.open(path + ".tmp.mkv", "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:   # the demuxer's final empty packet
                continue
            packet.stream = stream
            out.mux(packet)
    os.replace(path + ".tmp.mkv", path)


def status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(path, frames):
    """In this process: read the frames, print seconds, RSS before, peak RSS during (MiB)."""
    sys.path.insert(0, ROOT)
    import interleave
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")
    before = status_kib("VmRSS")
    start = time.perf_counter()
    images = interleave.read_video_frames(path, frames)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    assert len(images) == frames and images[0].size == (WIDTH, HEIGHT)
    print(f"{seconds:.2f} {before / 1024:.0f} {peak / 1024:.0f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--measure", help=argparse.SUPPRESS)   # the child process: one file
    args = p.parse_args()
    if args.measure:
        return measure(args.measure, args.frames)
    mp4 = os.path.join(args.dir, f"interleave-{args.minutes:g}min-720p.mp4")
    mkv = mp4[:-4] + ".mkv"
    if not os.path.exists(mp4):
        start = time.perf_counter()
        write_video(mp4, args.minutes)
        print(f"wrote {mp4} ({os.path.getsize(mp4) / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    if not os.path.exists(mkv):
        remux(mp4, mkv)
    with av.open(mp4) as container:
        total = container.streams.video[0].frames
    all_rgb = total * WIDTH * HEIGHT * 3 / 2 ** 30
    print(f"{total} frames of {WIDTH}x{HEIGHT}: all of them as RGB would take {all_rgb:.1f} GiB")
    for path in (mp4, mkv):
        out = subprocess.run([sys.executable, __file__, "--measure", path, "--frames", str(args.frames)],
                             capture_output=True, text=True, check=True).stdout.split()
        seconds, before, peak = (float(value) for value in out)
        print(f"{os.path.basename(path)}: {args.frames} frames in {seconds:.1f} s, RSS {before:.0f} MiB before, "
              f"peak {peak:.0f} MiB during (+{peak - before:.0f} MiB)")


if __name__ == "__main__":
    main()
