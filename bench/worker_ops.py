#!/usr/bin/env python3
"""Worker ops benchmark: framelink-worker next to the seeds' Python way (OpenCV, Pillow).

Runs `cargo bench -p framelink-worker --bench worker_ops` (which also writes the 1080p input
JPEG), then the same decode -> op -> encode pipelines in Python with OpenCV and with Pillow on
the same bytes, one thread each, and prints a markdown table with frames/s and the ratio
framelink / Python. Written to bench/results/worker-ops.md as well.

Usage: scripts/bench-worker [--seconds S]   (installs numpy, pillow, opencv from PyPI first)
"""

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import time

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageChops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Same list and order as cloud-workers/benches/worker_ops.rs.
PIPELINES = ["", "grayscale", "blur:1.5", "sobel", "sharpen", "rotate:90", "rotate:180", "rotate:270", "rotate:90,grayscale", "resize:1280x720", "resize:640x360", "crop:1280x720+320+180", "crop:1280x720+320+176"]
QUALITY = 85
SHARPEN = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=np.float32)


def cv_op(img, op):
    name, _, arg = op.partition(":")
    if name == "grayscale":
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if name == "blur":
        return cv2.GaussianBlur(img, (0, 0), float(arg))
    if name == "sobel":
        g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
        gx = cv2.Sobel(g, cv2.CV_16S, 1, 0, ksize=3)
        gy = cv2.Sobel(g, cv2.CV_16S, 0, 1, ksize=3)
        mag = cv2.magnitude(gx.astype(np.float32), gy.astype(np.float32))
        return np.clip(mag, 0, 255).astype(np.uint8)
    if name == "sharpen":
        return cv2.filter2D(img, -1, SHARPEN)
    if name == "rotate":
        return cv2.rotate(img, {"90": cv2.ROTATE_90_CLOCKWISE, "180": cv2.ROTATE_180, "270": cv2.ROTATE_90_COUNTERCLOCKWISE}[arg])
    if name == "resize":
        w, h = map(int, arg.split("x"))
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LANCZOS4)
    if name == "crop":
        size, x, y = arg.split("+")
        w, h = map(int, size.split("x"))
        return img[int(y):int(y) + h, int(x):int(x) + w]
    raise ValueError(op)


def pil_op(img, op):
    name, _, arg = op.partition(":")
    if name == "grayscale":
        return img.convert("L")
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(float(arg)))
    if name == "sobel":
        g = img.convert("L")
        gx = g.filter(ImageFilter.Kernel((3, 3), [-1, 0, 1, -2, 0, 2, -1, 0, 1], scale=1))
        gy = g.filter(ImageFilter.Kernel((3, 3), [-1, -2, -1, 0, 0, 0, 1, 2, 1], scale=1))
        # Pillow clips each signed response to 0-255: one direction only, the usual shortcut.
        return ImageChops.add(gx, gy)
    if name == "sharpen":
        return img.filter(ImageFilter.Kernel((3, 3), [0, -1, 0, -1, 5, -1, 0, -1, 0], scale=1))
    if name == "rotate":
        return img.transpose({"90": Image.Transpose.ROTATE_270, "180": Image.Transpose.ROTATE_180, "270": Image.Transpose.ROTATE_90}[arg])
    if name == "resize":
        w, h = map(int, arg.split("x"))
        return img.resize((w, h), Image.Resampling.LANCZOS)
    if name == "crop":
        size, x, y = arg.split("+")
        w, h = map(int, size.split("x"))
        return img.crop((int(x), int(y), int(x) + w, int(y) + h))
    raise ValueError(op)


def run_cv(jpeg, spec):
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    for op in filter(None, spec.split(",")):
        img = cv_op(img, op)
    ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    assert ok
    return out


def run_pil(jpeg, spec):
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    for op in filter(None, spec.split(",")):
        img = pil_op(img, op)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def median_ms(fn, jpeg, spec, seconds):
    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.3:
        fn(jpeg, spec)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn(jpeg, spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per op and implementation")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "worker-ops.md"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    work = os.path.join(ROOT, "target", "bench")
    os.makedirs(work, exist_ok=True)
    frame, tsv = os.path.join(work, "frame-1080p.jpg"), os.path.join(work, "worker-ops.tsv")

    subprocess.run(["cargo", "bench", "--locked", "-p", "framelink-worker", "--bench", "worker_ops", "--",
                    "--seconds", str(args.seconds), "--write-input", frame, "--tsv", tsv], cwd=ROOT, check=True)
    rust = {}
    with open(tsv) as f:
        next(f)
        for line in f:
            spec, ms, _, pixel_ms, path = line.rstrip("\n").split("\t")
            rust[spec] = (float(ms), float(pixel_ms), path)
    jpeg = open(frame, "rb").read()
    cv2.setNumThreads(1)  # one core, like the Rust side

    rows = []
    for spec in PIPELINES:
        cv_ms = median_ms(run_cv, jpeg, spec, args.seconds)
        pil_ms = median_ms(run_pil, jpeg, spec, args.seconds)
        ms, pixel_ms, path = rust[spec]
        rows.append((spec or "(re-encode only)", ms, pixel_ms, path, cv_ms, pil_ms))
        print(f"{spec or '(re-encode only)':<28} framelink {1e3 / ms:7.1f} fps ({path})  pixel path {1e3 / pixel_ms:7.1f} fps  opencv {1e3 / cv_ms:7.1f} fps  pillow {1e3 / pil_ms:7.1f} fps", flush=True)

    # The plain re-encode of the same picture encoded at q80 (the agent's default): the
    # worker's DCT-domain re-encode then rescales every coefficient into q85's tables.
    jpeg80 = open(frame + ".q80.jpg", "rb").read()
    cv_ms, pil_ms = median_ms(run_cv, jpeg80, "", args.seconds), median_ms(run_pil, jpeg80, "", args.seconds)
    ms, pixel_ms, path = rust["@q80"]
    rows.insert(1, ("(re-encode of a q80 frame)", ms, pixel_ms, path, cv_ms, pil_ms))
    print(f"{'(re-encode of a q80 frame)':<28} framelink {1e3 / ms:7.1f} fps ({path})  pixel path {1e3 / pixel_ms:7.1f} fps  opencv {1e3 / cv_ms:7.1f} fps  pillow {1e3 / pil_ms:7.1f} fps", flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Decode -> op -> encode (quality {QUALITY}) of a 1920x1080 JPEG, one thread each, median of {args.seconds:g} s per cell.",
        f"Machine: {cpu}, {os.cpu_count()} cores. OpenCV {cv2.__version__}, Pillow {Image.__version__}, NumPy {np.__version__}, Python {platform.python_version()}.",
        "glibc malloc, both sides: " + ("defaults (FRAMELINK_MALLOC_DEFAULTS=1)." if os.environ.get("FRAMELINK_MALLOC_DEFAULTS") else
                                       f"mmap threshold {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}, trim threshold {os.environ.get('MALLOC_TRIM_THRESHOLD_', 'default')} (framelink-worker's setting)."),
        "",
        "framelink's path: `dct` = lossless transform in the DCT domain (no decode, no encode; for the re-encode: requantised there),",
        "`planes` = geometry or colour",
        "ops on the decoded YUV planes, encoded from them (`sharpen` there sharpens the luma only: less work than RGB's three",
        "channels), `region` = only the region of a leading crop decoded, `luma` = the Y plane decoded alone, `pixels` = decode",
        "to RGB, ops, encode.",
        "\"pixel path\" = framelink with those fast paths off, same run (the before).",
        "",
        "| pipeline | path | framelink fps | pixel path fps | OpenCV fps | Pillow fps | framelink / OpenCV | framelink / Pillow | fast / pixel path |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r, b, path, c, p in rows:
        lines.append(f"| `{name}` | {path} | {1e3 / r:.1f} | {1e3 / b:.1f} | {1e3 / c:.1f} | {1e3 / p:.1f} | {c / r:.2f}x | {p / r:.2f}x | {b / r:.2f}x |")
    table = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"written to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
