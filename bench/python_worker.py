#!/usr/bin/env python3
"""The usual Python Kafka image worker — what framelink-worker replaces (issue #19): a
confluent-kafka consumer polls a record, OpenCV decodes it, runs the pipeline's ops
(bench/worker_ops.py's `cv_op`, the same definitions as the ops benchmark), encodes JPEG q85,
and a confluent-kafka producer with framelink-worker's producer settings (acks=all,
idempotence, linger 5 ms) publishes it with the record's key and headers; offsets are
auto-committed (the client's default). One thread, `cv2.setNumThreads(1)`. Run by
bench/worker_backlog.py pinned to one core (`taskset -c 0`) until it is terminated.

Usage: python_worker.py BOOTSTRAP GROUP TOPIC RESULTS PIPELINE
"""

import signal
import sys

import cv2
import numpy as np
from confluent_kafka import Consumer, Producer

from worker_ops import QUALITY, cv_op


def main():
    bootstrap, group, topic, results, pipeline = sys.argv[1:6]
    cv2.setNumThreads(1)
    ops = [op for op in pipeline.split(",") if op]
    quiet = {"log_level": 3}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest", **quiet})
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5, "message.max.bytes": 16777216, **quiet})
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    c.subscribe([topic])
    while not stopping:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        img = cv2.imdecode(np.frombuffer(m.value(), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            continue  # a corrupt frame (none in the benchmark's backlog)
        for op in ops:
            img = cv_op(img, op)
        ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
        if not ok:
            raise SystemExit(f"python_worker: OpenCV could not encode the result of offset {m.offset()}")
        p.produce(results, jpeg.tobytes(), key=m.key(), headers=m.headers())
        p.poll(0)
    p.flush(30)
    c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
