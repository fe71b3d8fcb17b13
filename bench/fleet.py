"""Worker-fleet experiments of the benchmark suite (run by bench/suite.py):

2. Lag over time: a fixed camera load that one worker cannot keep up with, on 1, 2 and 4
   workers with as many partitions; the lag (frames offered minus results published),
   sampled every half second during the load and until it drains.
3. Throughput vs workers: a backlog of 1024², 2048² and 4096² JPEGs processed by 1, 2 and 4
   workers; frames/s from the first result to the last.

Workers are the real `framelink-worker` binary (CPU backend, one processing thread each, so
"workers" means processes sharing the machine's cores), against the local broker.
"""

import json
import os
import tempfile
import urllib.request
import time
import uuid

from benchlib import (ROOT, QUIET_BROKER_LOGS, Watermarks, binary, create_topics, frames, free_port, machine, plot_lines, profile,
                      start, stop, wait_until, worker_toml, write_table)

LAG_PIPELINE = "blur:2"
QUICK_LAG_PIPELINE = "resize:320x180"  # --quick runs debug builds: a smoke test, not a load


def _producer(bootstrap):
    from confluent_kafka import Producer
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 16777216, **QUIET_BROKER_LOGS})


def _assigned(ports):
    """Partitions the workers own (from /healthz), or 0 while one of them owns none."""
    total = 0
    for port in ports:
        try:
            parts = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)).get("partitions") or []
        except OSError:
            return 0
        if not parts:
            return 0
        total += len(parts)
    return total


def _workers(d, bootstrap, n, group, topic, results, pipeline, partitions):
    """Starts n workers and waits until the group's assignment has settled (each owns some)."""
    procs, ports = [], []
    for i in range(n):
        ports.append(free_port())
        worker_toml(f"{d}/w{i}.toml", bootstrap, group, topic, results, pipeline, threads=1, http_port=ports[-1])
        procs.append(start([binary("framelink-worker"), "run", "--config", f"{d}/w{i}.toml"], f"{d}/w{i}.log", FRAMELINK__WORKER__ID=f"w{i}"))
    if not wait_until(lambda: _assigned(ports) == partitions, 90, 0.5):
        stop(procs)
        raise SystemExit(f"{n} worker(s) did not settle on {partitions} partitions in 90 s (logs in {d})")
    return procs


def _topics(bootstrap, what, partitions):
    """A fresh input topic and a results topic (+ its events / dead-letter topics); a run id."""
    run = uuid.uuid4().hex[:8]
    topic, results = f"bench-{what}-in-{run}", f"bench-{what}-out-{run}"
    create_topics(bootstrap, [topic, results, results + ".events", results + ".dlq"], partitions)
    return run, topic, results


def _backlog_rate(bootstrap, payloads, n, partitions, k, pipeline, what):
    """n workers (settled on `partitions` partitions) given a backlog of k frames: frames/s from
    the first result to the last."""
    run, topic, results = _topics(bootstrap, "tput", partitions)
    wm = Watermarks(bootstrap)
    with tempfile.TemporaryDirectory() as d:
        procs = _workers(d, bootstrap, n, f"bench-tput-{run}", topic, results, pipeline, partitions)
        p = _producer(bootstrap)
        started = time.time()
        for i in range(k):
            p.produce(topic, payloads[i % len(payloads)], key=f"cam{i % partitions}", partition=i % partitions)
        p.flush(60)
        first = None
        deadline = time.time() + 300
        while time.time() < deadline:
            c = wm.total(results, partitions)
            if c and first is None:
                first = (time.time(), c)
            if c >= k:
                break
            time.sleep(0.05)
        end, done = time.time(), wm.total(results, partitions)
        stop(procs)
    wm.close()
    if done < k or first is None:
        raise SystemExit(f"{what}, {n} worker(s): {done} of {k} results in 300 s")
    if k - first[1] >= 2 and end > first[0]:
        return (k - first[1]) / (end - first[0])
    # Everything came out within one sample (a tiny or very fast backlog): count from the
    # start of producing instead (includes the fetch delay, so it under-reports a little).
    return k / (end - started)


def lag_over_time(bootstrap, out_dir, quick):
    payloads = [open(f, "rb").read() for f in frames(os.path.join(ROOT, "target", "bench", "frames"), 1920, 1080)]
    seconds, counts, drain_limit = (3, (1, 2), 20) if quick else (20, (1, 2, 4), 60)
    pipeline = QUICK_LAG_PIPELINE if quick else LAG_PIPELINE
    # The load: 1.6x what one worker sustains here (measured first), so one falls behind.
    capacity = _backlog_rate(bootstrap, payloads, 1, 1, 20 if quick else 60, pipeline, "lag over time: one worker's capacity")
    fps = max(1, round(1.6 * capacity))
    print(f"  one worker sustains {capacity:.1f} frames/s of `{pipeline}`; offering {fps}", flush=True)
    series, rows = {}, []
    for n in counts:
        run, topic, results = _topics(bootstrap, "lag", n)
        wm = Watermarks(bootstrap)
        with tempfile.TemporaryDirectory() as d:
            procs = _workers(d, bootstrap, n, f"bench-lag-{run}", topic, results, pipeline, n)
            p = _producer(bootstrap)
            base = wm.total(results, n)
            t0, sent, samples, next_sample = time.time(), 0, [], time.time()
            load_end = t0 + seconds
            while True:
                now = time.time()
                if now < load_end:
                    for _ in range(int((now - t0) * fps) - sent):
                        p.produce(topic, payloads[sent % len(payloads)], key=f"cam{sent % (4 * n)}", partition=sent % n)
                        sent += 1
                    p.poll(0)
                if now >= next_sample:
                    processed = wm.total(results, n) - base
                    samples.append((now - t0, sent - processed, processed))
                    next_sample += 0.5
                    if now >= load_end and processed >= sent:
                        break
                    if now > load_end + drain_limit:
                        break
                time.sleep(0.005)
            p.flush(30)
            stop(procs)
        wm.close()
        during = [s for s in samples if s[0] <= seconds]
        done_at = next((t for t, lag, _ in samples if t > seconds and lag <= 0), None)
        rate = during[-1][2] / during[-1][0] if during and during[-1][0] > 0 else 0.0
        rows.append((n, fps, sent, rate, max(l for _, l, _ in samples), during[-1][1] if during else 0,
                     f"{done_at - seconds:.1f}" if done_at else f"> {drain_limit}"))
        series[f"{n} worker(s), {n} partition(s)"] = ([s[0] for s in samples], [s[1] for s in samples])
        print(f"  {n} worker(s): offered {fps} fps for {seconds} s ({sent} frames), processed {rate:.1f} fps during the load, "
              f"max lag {rows[-1][4]}, lag at the end of the load {rows[-1][5]}, drained {rows[-1][6]} s after it", flush=True)
    png = os.path.join(out_dir, "lag-over-time.png")
    plot_lines(series, png, f"Consumer lag, {fps} fps of 1080p JPEG for {seconds} s ({pipeline}, 1 thread per worker)",
               "seconds since the load started", "lag (frames offered - results)")
    lines = [
        f"Lag over time: {fps} frames/s of 1920x1080 JPEG (1.6x the {capacity:.1f} frames/s one worker sustained in a backlog run just before) "
        f"offered for {seconds} s to a topic with as many partitions as workers; "
        f"framelink-worker ({profile()}, pipeline `{pipeline}`, 1 processing thread each, CPU backend); lag = frames offered - "
        f"results published, sampled every 0.5 s. Everything, broker included, on one machine: {machine()}. Plot: lag-over-time.png.",
        "",
        "| workers = partitions | offered fps | frames | processed fps during the load | max lag | lag when the load stopped | drained after (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ] + [f"| {n} | {f} | {s} | {r:.1f} | {m} | {e} | {dr} |" for n, f, s, r, m, e, dr in rows]
    return write_table(out_dir, "lag-over-time.md", lines)


def throughput_vs_workers(bootstrap, out_dir, quick):
    sizes = ((1024, 8), (2048, 4), (4096, 2)) if quick else ((1024, 120), (2048, 40), (4096, 12))
    counts = (1, 2) if quick else (1, 2, 4)
    pipeline = "sobel"
    rows = []
    for side, k in sizes:
        payloads = [open(f, "rb").read() for f in frames(os.path.join(ROOT, "target", "bench", "frames"), side, side)]
        avg_mb = sum(len(payloads[i % len(payloads)]) for i in range(k)) / k / 1e6
        base = None
        for n in counts:
            fps = _backlog_rate(bootstrap, payloads, n, 4, k, pipeline, f"throughput {side}x{side}")
            base = base or fps
            rows.append((side, n, k, avg_mb, fps, fps * side * side / 1e6, fps / base))
            print(f"  {side}x{side}, {n} worker(s): {fps:.2f} frames/s ({fps * side * side / 1e6:.1f} MPixel/s), {fps / base:.2f}x one worker", flush=True)
    lines = [
        f"Throughput vs workers: a backlog of JPEGs (photographs resized to N x N, q85) on a 4-partition topic, processed by 1..4 "
        f"framelink-worker processes ({profile()}, pipeline `{pipeline}`, 1 processing thread each, CPU backend); frames/s from the "
        f"first result to the last. Broker, workers and all on one machine: {machine()} — more workers than cores cannot add speed.",
        "",
        "| image | workers | frames | avg JPEG MB | frames/s | MPixel/s | vs 1 worker |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ] + [f"| {s}x{s} | {n} | {k} | {mb:.2f} | {f:.2f} | {mp:.1f} | {x:.2f}x |" for s, n, k, mb, f, mp, x in rows]
    return write_table(out_dir, "throughput-vs-workers.md", lines)
