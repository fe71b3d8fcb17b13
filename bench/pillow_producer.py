#!/usr/bin/env python3
"""The usual Python edge loop, for issue #19 item 3's comparison with the agent: camera buffers
(YUYV or NV12, BT.601 studio range, as written by the agent's edge_pipeline bench with
FRAMELINK_BENCH_DUMP) -> OpenCV colour conversion to RGB -> Pillow JPEG (quality 80, 4:2:0,
the agent's defaults) -> confluent-kafka produce with the agent's producer settings (acks=all,
idempotent, linger.ms=5, no compression), delivery callbacks served by poll(0) after each
produce. Run it pinned (`taskset -c 0`) like the agent's bench; prints one JSON line:
frames acknowledged per second over `--seconds` after a 2 s warm-up.
"""

import argparse
import glob
import io
import json
import os
import sys
import time

import cv2
import numpy as np
from confluent_kafka import Producer
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QUIET_BROKER_LOGS  # noqa: E402

CONVERT = {"yuyv": cv2.COLOR_YUV2RGB_YUY2, "nv12": cv2.COLOR_YUV2RGB_NV12}


def load(directory, fmt, w, h):
    shape = (h, w, 2) if fmt == "yuyv" else (h * 3 // 2, w)
    paths = sorted(glob.glob(os.path.join(directory, f"frame-*.{fmt}")))
    if not paths:
        raise SystemExit(f"pillow_producer: no frame-*.{fmt} in {directory}")
    return [np.fromfile(p, np.uint8).reshape(shape) for p in paths]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--format", choices=sorted(CONVERT), required=True)
    ap.add_argument("--dir", required=True, help="where the edge_pipeline bench dumped the frames")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    frames = load(a.dir, a.format, a.width, a.height)
    p = Producer({"bootstrap.servers": a.bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
                  "compression.type": "none", "message.max.bytes": 4 * 1024 * 1024 + 65536, **QUIET_BROKER_LOGS})
    acked, failed = [0], [0]

    def delivered(err, _msg):
        if err is None:
            acked[0] += 1
        else:
            failed[0] += 1

    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    warm, end = t0 + 2.0, t0 + 2.0 + a.seconds
    at_warm, sizes, i = None, 0, 0
    while True:
        now = time.perf_counter()
        if at_warm is None and now >= warm:
            at_warm = acked[0]
        if now >= end:
            break
        rgb = cv2.cvtColor(frames[i % len(frames)], CONVERT[a.format])
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=80, subsampling="4:2:0")
        jpeg = buf.getvalue()
        sizes += len(jpeg)
        while True:
            try:
                p.produce(a.topic, jpeg, key=f"bench/cam0", on_delivery=delivered)
                break
            except BufferError:
                p.poll(0.001)
        p.poll(0)
        i += 1
    at_end = acked[0]
    p.flush(60)
    print(json.dumps({"format": a.format, "frames_per_s": (at_end - at_warm) / a.seconds, "produced": i, "acknowledged": acked[0],
                      "failed": failed[0], "avg_jpeg_bytes": sizes / max(1, i)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
