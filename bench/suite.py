#!/usr/bin/env python3
"""framelink benchmark suite (issue #7), run by scripts/bench-suite against the local broker.

Experiments (--only picks some):
  1. producer settings sweep: 1080p JPEG frames made from testdata/images, for each
     (batch.size, linger.ms, compression) setting: framelink's producer (rdkafka, the agent's
     client: bench/src/bin/framelink-bench-producer.rs; as a ThreadedProducer, as a
     BaseProducer polled inline, and as the agent's drain drives it: a ThreadedProducer with at
     most a window of bytes in flight), the seeds' approach (Python
     confluent-kafka with the same settings) and kcat (librdkafka's own CLI, the ceiling
     without application code). Records/s, MB/s, p50 / p99 delivery latency (send -> ack),
     the client's CPU per record.
  2. lag over time with 1, 2 and 4 workers (bench/fleet.py);
  3. throughput vs workers on 1024², 2048² and 4096² images (bench/fleet.py);
  4. edge path: raw encode vs agent, CPU / RSS at 1080p30, backlog drain after an outage
     (bench/edge.py; stops and restarts the local broker);
  5. end-to-end latency, capture -> result seen by a reader, p50 / p99, with 1, 4 and 8
     synthetic 1280x720 cameras at 30 fps: framelink-agent -> Kafka -> framelink-worker
     (resize:640x360) -> `framelink-worker tail`, all on this machine;
  6. RTSP ingest: a 1080p H.264 IP camera (tests/rtsp/server.py) to JPEG at 5 fps and at
     full rate, CPU per frame and RSS: framelink-agent vs ffmpeg vs GStreamer (bench/rtsp.py);
  7. large-image jobs: framelink-console's /api/jobs with 1 and 2 workers on 1024², 2048² and
     4096² images (grayscale, blur, sobel), tiles/s and seconds per job end to end, and a
     16384² job with the console's and workers' peak memory (bench/jobs.py).
  8. inference: a text detector (PP-OCRv4) on 1080p frames, framelink-worker against Python
     onnxruntime + OpenCV pre/post-processing, ONNX Runtime threads 1 and 2 (bench/inference.py).
  9. worker backlog: a 1080p backlog drained through Kafka by one framelink-worker thread and by
     the usual Python worker (confluent-kafka + OpenCV), each pinned to one core
     (bench/worker_backlog.py, bench/python_worker.py).
Writes bench/results/*.md and .png (or bench/results/quick/ with --quick, which runs a tiny
grid as a smoke test and asserts no speed).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import QUIET_BROKER_LOGS, ROOT, broker, create_topics, delete_topics, frames, machine, plot_bars, write_table  # noqa: E402
import edge  # noqa: E402
import inference  # noqa: E402
import fleet  # noqa: E402
import jobs  # noqa: E402
import rtsp  # noqa: E402
import worker_backlog  # noqa: E402


def settings_args(s):
    return {"batch.size": str(s["batch"]), "linger.ms": str(s["linger"]), "compression.codec": s["compression"]}


def cpu_s(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def window_bytes(s, files):
    """4 requests' worth, as the agent's drain keeps (forwarder.drain_window_bytes, 2 MiB with
    librdkafka's default batch.size of 1 MB and frames sent as acknowledgements free room):
    librdkafka's idempotent producer carries 5 requests at a time, and a window below
    batch.size would make every request wait out linger.ms."""
    return 4 * max(s["batch"], max(os.path.getsize(f) for f in files))


def run_framelink(bootstrap, topic, count, s, files, inline=False, window=False):
    exe = os.path.join(ROOT, "target", os.environ.get("FRAMELINK_BENCH_PROFILE", "release"), "framelink-bench-producer")
    cmd = [exe, "--brokers", bootstrap, "--topic", topic, "--count", str(count)] + (["--inline-poll"] if inline else [])
    if window:
        cmd += ["--window-bytes", str(window_bytes(s, files))]
    for k, v in settings_args(s).items():
        cmd += ["--set", f"{k}={v}"]
    c0 = cpu_s(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd + files, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["cpu_ms"] = (cpu_s(resource.RUSAGE_CHILDREN) - c0) / count * 1e3
    if window:
        r["impl"] = "framelink (rdkafka, in-flight window)"
    return r


def run_python(bootstrap, topic, count, s, files):
    """The seeds' way: confluent-kafka Producer, produce() + poll(0), delivery callbacks."""
    from confluent_kafka import Producer

    payloads = [open(f, "rb").read() for f in files]
    c0 = cpu_s(resource.RUSAGE_SELF)
    conf = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "message.max.bytes": 16777216, **settings_args(s), **QUIET_BROKER_LOGS}
    p = Producer(conf)
    lat, failed = [], [0]

    def acked(err, _msg, sent):
        if err is None:
            lat.append(time.perf_counter() - sent)
        else:
            failed[0] += 1

    nbytes = 0
    t0 = time.perf_counter()
    for i in range(count):
        payload = payloads[i % len(payloads)]
        while True:
            sent = time.perf_counter()
            try:
                p.produce(topic, payload, key=f"bench/cam{i % 4}", on_delivery=lambda e, m, sent=sent: acked(e, m, sent))
                break
            except BufferError:
                p.poll(0.001)
        p.poll(0)
        nbytes += len(payload)
    p.flush(120)
    secs = time.perf_counter() - t0
    cpu_ms = (cpu_s(resource.RUSAGE_SELF) - c0) / count * 1e3
    lat.sort()
    pct = lambda q: lat[round((len(lat) - 1) * q)] * 1e3 if lat else float("nan")
    return {"impl": "Python confluent-kafka", "records": count, "acknowledged": len(lat), "failed": failed[0], "bytes": nbytes, "seconds": secs,
            "records_per_s": len(lat) / secs, "mb_per_s": nbytes / secs / 1e6, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "cpu_ms": cpu_ms}


def run_kcat(bootstrap, topic, count, s, files):
    """kcat -P with one file per record: throughput only (kcat reports no per-record latency)."""
    args = ["kcat", "-P", "-b", bootstrap, "-t", topic, "-X", "acks=all", "-X", "enable.idempotence=true", "-X", "message.max.bytes=16777216"]
    for k, v in settings_args(s).items():
        args += ["-X", f"{k}={v}"]
    record_files = [files[i % len(files)] for i in range(count)]
    nbytes = sum(os.path.getsize(f) for f in record_files)
    c0 = cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args + record_files, check=True, capture_output=True)
    secs = time.perf_counter() - t0
    return {"impl": "kcat (librdkafka CLI)", "records": count, "acknowledged": count, "failed": 0, "bytes": nbytes, "seconds": secs,
            "records_per_s": count / secs, "mb_per_s": nbytes / secs / 1e6, "p50_ms": float("nan"), "p99_ms": float("nan"),
            "cpu_ms": (cpu_s(resource.RUSAGE_CHILDREN) - c0) / count * 1e3}


def grid(quick):
    if quick:
        return [{"batch": 16384, "linger": 0, "compression": "none"}, {"batch": 1048576, "linger": 5, "compression": "lz4"}]
    out = []
    for batch in (16384, 262144, 2097152):
        for linger in (0, 5, 10):
            out.append({"batch": batch, "linger": linger, "compression": "none"})
    for comp in ("snappy", "lz4", "gzip", "zstd"):
        out.append({"batch": 1048576, "linger": 5, "compression": comp})
    return out


def producer_sweep(bootstrap, out_dir, quick, repeats):
    files = frames(os.path.join(ROOT, "target", "bench", "frames"), 1920, 1080)
    avg_kb = statistics.mean(os.path.getsize(f) for f in files) / 1024
    count = 40 if quick else 2000
    impls = [("framelink (rdkafka)", run_framelink),
             ("framelink (rdkafka, inline poll)", lambda *a: run_framelink(*a, inline=True)),
             ("framelink (rdkafka, in-flight window)", lambda *a: run_framelink(*a, window=True)),
             ("Python confluent-kafka", run_python), ("kcat (librdkafka CLI)", run_kcat)]
    rows = []
    for s in grid(quick):
        for name, fn in impls:
            runs = []
            for _ in range(repeats):
                topic = f"bench-producer-{uuid.uuid4().hex[:12]}"
                r = fn(bootstrap, topic, count, s, files)
                delete_topics(bootstrap, [topic])
                if r["failed"] or r["acknowledged"] != count:
                    raise SystemExit(f"{name} {s}: {r['failed']} failed, {r['acknowledged']} of {count} acknowledged")
                runs.append(r)
            med = lambda k: statistics.median(x[k] for x in runs)
            row = {"setting": s, "impl": name, **{k: med(k) for k in ("records_per_s", "mb_per_s", "p50_ms", "p99_ms", "cpu_ms")}}
            rows.append(row)
            print(f"  {s['batch'] // 1024:>5} KB linger {s['linger']:>2} {s['compression']:<6} {name:<38} {row['records_per_s']:8.1f} rec/s {row['mb_per_s']:7.1f} MB/s  "
                  f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  CPU {row['cpu_ms']:.2f} ms/record", flush=True)

    kcat_v = subprocess.run(["kcat", "-V"], capture_output=True, text=True).stdout.split("Version ", 1)[-1].split(" (")[0]
    import confluent_kafka
    lines = [
        f"Producer settings sweep: {count} records of 1920x1080 JPEG (avg {avg_kb:.0f} KiB, {len(files)} photos from testdata/images) "
        f"per cell, acks=all, idempotent, 1 partition, local broker (PLAINTEXT); median of {repeats} run(s).",
        f"Machine: {machine()}. librdkafka: framelink {rdkafka_version()} (rdkafka crate), confluent-kafka {confluent_kafka.version()} "
        f"(librdkafka {confluent_kafka.libversion()[0]}), kcat {kcat_v}.",
        "",
        "Client CPU: user + system seconds of the client's process (framelink, kcat) or of the Python process, per record.",
        "",
        "| batch.size | linger.ms | compression | client | records/s | MB/s | p50 ms | p99 ms | client CPU ms / record | vs Python (records/s) |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    n = len(impls)
    for i in range(0, len(rows), n):
        py = next(r["records_per_s"] for r in rows[i:i + n] if r["impl"].startswith("Python"))
        for r in rows[i:i + n]:
            s = r["setting"]
            fmt = lambda v: "-" if v != v else f"{v:.1f}"
            lines.append(f"| {s['batch'] // 1024} KB | {s['linger']} | {s['compression']} | {r['impl']} | {r['records_per_s']:.1f} | {r['mb_per_s']:.1f} | "
                         f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {r['cpu_ms']:.2f} | {r['records_per_s'] / py:.2f}x |")
    plot_sweep(rows, os.path.join(out_dir, "producer-sweep.png"))
    return write_table(out_dir, "producer-sweep.md", lines)


def rdkafka_version():
    lock = open(os.path.join(ROOT, "Cargo.lock")).read()
    i = lock.find('name = "rdkafka-sys"')
    return lock[i:].split('version = "', 1)[1].split('"', 1)[0].split("+", 1)[-1] if i >= 0 else "?"


def plot_sweep(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = []
    for r in rows:
        l = f"{r['setting']['batch'] // 1024}K/{r['setting']['linger']}ms/{r['setting']['compression']}"
        if l not in order:
            order.append(l)
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.9), 4))
    w = 0.8 / len(impls)
    for j, name in enumerate(impls):
        vals = [next(r["records_per_s"] for r in rows if r["impl"] == name and f"{r['setting']['batch'] // 1024}K/{r['setting']['linger']}ms/{r['setting']['compression']}" == l) for l in order]
        ax.bar([i + j * w for i in range(len(order))], vals, w, label=name)
    ax.set_xticks([i + w * (len(impls) - 1) / 2 for i in range(len(order))], order, rotation=45, ha="right")
    ax.set_ylabel("records/s (1080p JPEG)")
    ax.set_title("Producer settings sweep (batch.size / linger.ms / compression)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def e2e_latency(bootstrap, out_dir, quick):
    """Agent (N synthetic cameras) -> Kafka -> worker -> tail; latencies from tail's summary."""
    import re
    import tempfile

    profile = os.environ.get("FRAMELINK_BENCH_PROFILE", "release")
    agent, worker = (os.path.join(ROOT, "target", profile, b) for b in ("framelink-agent", "framelink-worker"))
    cams_list, seconds = ((1,), 4) if quick else ((1, 4, 8), 20)
    rows = []
    for cams in cams_list:
        run = uuid.uuid4().hex[:8]
        with tempfile.TemporaryDirectory() as d:
            frames, results = f"bench-e2e-in-{run}", f"bench-e2e-out-{run}"
            cameras = "".join(f'[[cameras]]\nid = "cam{i}"\nsynthetic = {{ width = 1280, height = 720, fps = 30, count = {30 * seconds} }}\n' for i in range(cams))
            open(f"{d}/agent.toml", "w").write(
                f'[device]\nid = "bench"\n[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n{cameras}'
                f'[spool]\ndir = "{d}/spool"\n[forwarder]\ntopic = "{frames}"\n[http]\nlisten = ""\n')
            open(f"{d}/worker.toml", "w").write(
                f'[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n[consumer]\ngroup_id = "bench-{run}"\ntopics = ["{frames}"]\n'
                f'auto_offset_reset = "earliest"\n[output]\nresults_topic = "{results}"\nevents_topic = "{results}.events"\ndlq_topic = "{results}.dlq"\n'
                f'[worker]\npipeline = "resize:640x360"\n[http]\nlisten = ""\n')
            create_topics(bootstrap, [frames, results, results + ".events", results + ".dlq"], 1)
            env = dict(os.environ, FRAMELINK_LOG="warn")
            w = subprocess.Popen([worker, "run", "--config", f"{d}/worker.toml"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{d}/worker.log", "w"))
            t = subprocess.Popen([worker, "tail", "--config", f"{d}/worker.toml", "--seconds", str(seconds + 15), "--count", str(30 * seconds * cams), "--print-every", "1000000", "--from-beginning"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(3)  # the worker and the reader join their groups
            a = subprocess.Popen([agent, "run", "--config", f"{d}/agent.toml"], env=dict(env, FRAMELINK_LOG="info"), stdout=subprocess.DEVNULL, stderr=open(f"{d}/agent.log", "w"))
            out = t.communicate()[0]
            for proc in (a, w):
                proc.terminate()
                proc.wait(timeout=60)
            stopped = [l for l in open(f"{d}/agent.log") if "Agent stopped." in l]
            grab = lambda k: re.search(rf"{k}=(\d+)", stopped[-1]).group(1) if stopped else "?"
            captured, dropped = grab("captured"), grab("dropped")
        m = re.search(r"tail: (\d+) results .*capture->processed p50 (\S+) ms p99 (\S+) ms, capture->seen p50 (\S+) ms p99 (\S+) ms", out)
        if not m:
            raise SystemExit(f"e2e latency, {cams} camera(s): no summary from tail:\n{out[-2000:]}")
        n, pp50, pp99, s50, s99 = m.groups()
        rows.append((cams, int(n), 30 * seconds * cams, f"{captured} / {dropped}", pp50, pp99, s50, s99))
        print(f"  {cams} camera(s): {n} of {30 * seconds * cams} results seen; agent captured {captured}, dropped {dropped}; capture->processed p50 {pp50} p99 {pp99} ms; capture->seen p50 {s50} p99 {s99} ms", flush=True)
    lines = [
        f"End-to-end latency: N synthetic 1280x720 cameras at 30 fps for {seconds} s -> framelink-agent ({profile}) -> local Kafka (PLAINTEXT) -> "
        f"framelink-worker (resize:640x360, threads = cores) -> `framelink-worker tail`. Everything, broker included, on one machine: {machine()}.",
        "",
        "| cameras | results seen / frames | agent captured / dropped | capture -> processed p50 ms | p99 ms | capture -> seen p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ] + [f"| {c} | {n} / {total} | {dr} | {a} | {b} | {x} | {y} |" for c, n, total, dr, a, b, x, y in rows]
    lines.append("")
    lines.append("Plot: e2e-latency.png.")
    plot_bars([f"{c} camera(s)" for c, *_ in rows], {
        "capture -> processed p50": [float(r[4]) for r in rows], "p99": [float(r[5]) for r in rows],
        "capture -> seen p50": [float(r[6]) for r in rows], "seen p99": [float(r[7]) for r in rows],
    }, os.path.join(out_dir, "e2e-latency.png"), "End-to-end latency, 1280x720 cameras at 30 fps", "ms")
    return write_table(out_dir, "e2e-latency.md", lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny grid, smoke test only (CI); results in bench/results/quick/")
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8,9", help="experiments to run, e.g. 2,3 (default all)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per cell (median); default 3, 1 with --quick")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    out_dir = os.path.join(ROOT, "bench", "results", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    bootstrap = broker()
    only = set(args.only.split(","))
    started = t0 = time.time()
    if "1" in only:
        print(f"1. producer settings sweep ({'quick' if args.quick else 'full'}) against {bootstrap}")
        md = producer_sweep(bootstrap, out_dir, args.quick, repeats)
        print(f"written {os.path.relpath(md, ROOT)} and .png in {time.time() - t0:.0f} s")
    for key, title, fn in (("2", "lag over time", fleet.lag_over_time), ("3", "throughput vs workers", fleet.throughput_vs_workers),
                           ("4", "edge path", edge.edge_path), ("5", "end-to-end latency", e2e_latency),
                           ("6", "RTSP ingest", rtsp.rtsp_ingest), ("7", "large-image jobs", jobs.large_image_jobs),
                           ("8", "inference", inference.inference), ("9", "worker backlog", worker_backlog.worker_backlog)):
        if key in only:
            t0 = time.time()
            print(f"{key}. {title} ({'quick' if args.quick else 'full'})", flush=True)
            try:
                md = fn(bootstrap, out_dir, args.quick)
            finally:
                delete_topics(bootstrap)
            print(f"written {os.path.relpath(md, ROOT)} in {time.time() - t0:.0f} s", flush=True)
    print(f"benchmark suite done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
