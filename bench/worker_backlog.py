"""Experiment 9 of the benchmark suite (run by bench/suite.py): a worker draining a backlog
through Kafka, framelink against the usual Python worker (issue #19).

For each pipeline, one input topic (1 partition) is filled with the same 1080p JPEGs made
from the test photographs before any worker starts: a backlog. Then, in alternating rounds
(framelink, Python, framelink, Python…), each side drains it with a fresh consumer group into
its own results topic: the real `framelink-worker` (release, CPU backend, `threads = 1`) or
bench/python_worker.py (confluent-kafka + OpenCV, one thread), each pinned to core 0 with
`taskset -c 0` (its librdkafka threads too). The broker and this script share the machine.
Rate: results from the first one to the last, per second (the group join and the first fetch
are not in it); the median over the rounds per side.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from benchlib import ROOT, QUIET_BROKER_LOGS, Watermarks, binary, create_topics, frames, machine, profile, start, stop, worker_toml, write_table

PIPELINES = ["", "grayscale", "blur:1.5", "sobel", "sharpen", "rotate:90"]


def _fill(bootstrap, topic, payloads, k):
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 16777216, **QUIET_BROKER_LOGS})
    for i in range(k):
        p.produce(topic, payloads[i % len(payloads)], key=b"bench/cam0")
        p.poll(0)
    if p.flush(120):
        raise SystemExit(f"worker backlog: could not fill {topic}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid):
    """CPU seconds (user + system) of each thread of `pid` so far, by thread: {tid: (name, s)}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, fields = f.read().rsplit(")", 1)
        except OSError:
            continue  # the thread ended meanwhile
        fields = fields.split()
        out[tid] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def _rdkafka_share(before, after):
    """Of the CPU the process's threads spent between two `_thread_cpu` samples: librdkafka's
    threads' (named rdk:*) seconds and everyone's."""
    rdk = total = 0.0
    for tid, (name, s) in after.items():
        spent = s - before.get(tid, (name, 0.0))[1]
        total += spent
        if name.startswith("rdk:"):
            rdk += spent
    return rdk, total


def _drain(bootstrap, d, side, topic, k, pipeline):
    """One side drains the k-frame backlog of `topic`: results per second, first to last, and
    librdkafka's threads' CPU milliseconds per result over the same span (None if unknown)."""
    run = uuid.uuid4().hex[:8]
    results = f"bench-backlog-out-{run}"
    create_topics(bootstrap, [results, results + ".events", results + ".dlq"], 1)
    group = f"bench-backlog-{run}"
    if side == "framelink":
        worker_toml(f"{d}/{run}.toml", bootstrap, group, topic, results, pipeline, threads=1)
        cmd = ["taskset", "-c", "0", binary("framelink-worker"), "run", "--config", f"{d}/{run}.toml"]
    else:
        cmd = ["taskset", "-c", "0", sys.executable, os.path.join(ROOT, "bench", "python_worker.py"), bootstrap, group, topic, results, pipeline]
    wm = Watermarks(bootstrap)

    def count():
        """Results so far; 0 while the new topic's leader is not known yet (a just-created
        topic, or a broker restarted by experiment 4, answers NOT_LEADER for a moment)."""
        from confluent_kafka import KafkaException
        try:
            return wm.total(results, 1)
        except KafkaException:
            return 0

    proc = start(cmd, f"{d}/{side}-{run}.log")
    started = time.time()
    first, deadline = None, started + 300
    cpu_first = cpu_end = None
    try:
        while time.time() < deadline:
            c = count()
            if c and first is None:
                first = (time.time(), c)
                cpu_first = _thread_cpu(proc.pid)
            if c >= k:
                cpu_end = _thread_cpu(proc.pid)
                break
            if proc.poll() is not None:
                raise SystemExit(f"worker backlog: {side} exited ({proc.returncode}); log {d}/{side}-{run}.log:\n" + open(f"{d}/{side}-{run}.log").read()[-2000:])
            time.sleep(0.02)
        end, done = time.time(), count()
    finally:
        stop([proc])
        wm.close()
    if done < k:
        raise SystemExit(f"worker backlog `{pipeline}`, {side}: {done} of {k} results in 300 s")
    rdk_ms = None
    if first is not None and k - first[1] >= 2 and end > first[0]:
        if cpu_first and cpu_end:
            rdk_ms = _rdkafka_share(cpu_first, cpu_end)[0] * 1000 / (k - first[1])
        return (k - first[1]) / (end - first[0]), rdk_ms
    # Everything came out within one sample (--quick's tiny backlog): from the process's start
    # instead (includes joining the group, so it under-reports).
    return k / (end - started), rdk_ms


def worker_backlog(bootstrap, out_dir, quick):
    k, rounds = (20, 1) if quick else (300, 2)
    pipelines = ["grayscale", "blur:1.5"] if quick else PIPELINES
    payloads = [open(f, "rb").read() for f in frames(os.path.join(ROOT, "target", "bench", "frames"), 1920, 1080)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for pipeline in pipelines:
            topic = f"bench-backlog-in-{uuid.uuid4().hex[:8]}"
            create_topics(bootstrap, [topic], 1)
            _fill(bootstrap, topic, payloads, k)
            rates = {"framelink": [], "python": []}
            rdk = {"framelink": [], "python": []}
            for _ in range(rounds):
                for side in rates:
                    rate, rdk_ms = _drain(bootstrap, d, side, topic, k, pipeline)
                    rates[side].append(rate)
                    if rdk_ms is not None:
                        rdk[side].append(rdk_ms)
            fl, py = statistics.median(rates["framelink"]), statistics.median(rates["python"])
            ms = lambda v: f"{statistics.median(v):.2f}" if v else "–"
            name = f"`{pipeline}`" if pipeline else "(re-encode only)"
            print(f"  {name}: framelink {fl:.1f} frames/s, Python {py:.1f} ({fl / py:.2f}x)", flush=True)
            runs = lambda v: " / ".join(f"{x:.1f}" for x in v)
            rows.append(f"| {name} | {fl:.1f} | {py:.1f} | **{fl / py:.2f}x** | {runs(rates['framelink'])} | {runs(rates['python'])} "
                        f"| {ms(rdk['framelink'])} / {ms(rdk['python'])} |")
    lines = [
        f"Worker backlog through Kafka, one core: {k} 1080p JPEGs (q85, from the test photographs) already on a 1-partition topic, "
        f"drained by one framelink-worker (CPU backend, threads = 1) and by the usual Python worker (confluent-kafka poll -> OpenCV "
        f"decode -> op -> encode q85 -> produce, bench/python_worker.py), each pinned to core 0 (taskset) in alternating rounds; "
        f"results/s from the first result to the last, the median of {rounds} round(s) per side; librdkafka's threads' (rdk:*, "
        f"consumer and producer) CPU per result over the same span, median, from /proc/<pid>/task. "
        f"Machine: {machine()}; build: {profile()}.",
        "",
        "| pipeline | framelink frames/s | Python frames/s | framelink / Python | framelink rounds | Python rounds "
        "| librdkafka threads' CPU ms / result, framelink / Python |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: |",
        *rows,
    ]
    return write_table(out_dir, "worker-backlog.md", lines)
