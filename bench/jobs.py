"""Large-image jobs (experiment 7 of bench/suite.py): framelink-console's /api/jobs with 1 and 2
framelink-worker processes, end to end — upload (multipart PNG) -> tiles on Kafka -> workers ->
tile results -> stitched -> result downloaded (PNG) — on 1024², 2048² and 4096² images (the
test photographs as a mosaic) with grayscale, blur and sobel, 512-pixel tiles: tiles/s and
seconds per job, next to the 0.33-0.71 tiles/s the Python tile pipeline this replaces published
for 1-2 workers. Then a 16384x16384 (268 Mpx) job with 2 workers, with the peak memory (VmHWM)
of the console and of each worker.

Every result is checked against the job's promise on the way: the stitched image's size and
channels; bit-identity itself is asserted by the test suite (cloud-workers/console/tests/
e2e_jobs.rs), not here.
"""

import io
import json
import os
import tempfile
import time
import urllib.request
import uuid

from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the 16384² result is ours, not a bomb

from benchlib import IMAGES, binary, create_topics, free_port, machine, plot_bars, profile, start, stop, wait_until, write_table

PUBLISHED = (0.33, 0.71)  # tiles/s, 1-2 workers, 512x512 tiles (the pipeline framelink replaces)
PIPELINES = ("grayscale", "blur:2", "sobel")
TILE = 512
REPEATS = 3  # runs per cell; the median (by end-to-end seconds) is reported


def mosaic(size, cache):
    """A size x size PNG of the test photographs, side by side (every other one mirrored)."""
    path = os.path.join(cache, f"mosaic-{size}.png")
    if os.path.exists(path):
        return path
    photos = [Image.open(os.path.join(IMAGES, n)).convert("RGB") for n in sorted(os.listdir(IMAGES)) if n.lower().endswith((".jpg", ".png"))]
    out = Image.new("RGB", (size, size))
    x = y = k = 0
    while y < size:
        p = photos[k % len(photos)]
        if k % 2:
            p = p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.paste(p, (x, y))
        x += p.width
        k += 1
        if x >= size:
            x, y = 0, y + 640
    out.save(path, "PNG", compress_level=1)
    return path


def vmhwm(pid):
    """Peak resident memory of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Console:
    def __init__(self, d, bootstrap, topics):
        self.port = free_port()
        cfg = os.path.join(d, "console.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
                f'[console]\nlisten = "127.0.0.1:{self.port}"\n[topics]\nresults = ""\nevents = ""\ndlq = ""\n[lag]\ngroup = ""\n'
                f'[jobs]\ntiles_topic = "{topics["tiles"]}"\nresults_topic = "{topics["results"]}"\njobs_topic = "{topics["jobs"]}"\n'
                f'partitions = 4\nmax_upload_bytes = 2147483648\nmax_pixels = 300000000\nmax_held_bytes = 8589934592\n')
        self.proc = start([binary("framelink-console"), "run", "--config", cfg], os.path.join(d, "console.log"))
        if not wait_until(lambda: self.get("/healthz").get("jobs", {}).get("restored"), 60, 0.3):
            raise SystemExit(f"the console did not start (log: {d}/console.log)")

    def get(self, path):
        try:
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30))
        except OSError:
            return {}

    def run_job(self, png_path, pipeline):
        """Upload -> done -> result downloaded: (seconds end to end, job status)."""
        boundary = uuid.uuid4().hex
        with open(png_path, "rb") as f:
            data = f.read()
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\n{pipeline}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="tile"\r\n\r\n{TILE}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{os.path.basename(png_path)}"\r\n\r\n').encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/jobs", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        job = json.load(urllib.request.urlopen(req, timeout=600))
        jid = job["job_id"]
        while True:
            st = self.get(f"/api/jobs/{jid}")
            if st.get("status") in ("done", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if st["status"] != "done":
            raise SystemExit(f"job {jid} ({pipeline}) ended {st['status']}: {st}")
        result = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/jobs/{jid}/result", timeout=600).read()
        seconds = time.perf_counter() - t0
        img = Image.open(io.BytesIO(result))
        if img.size != (st["out_width"], st["out_height"]):
            raise SystemExit(f"job {jid}: result is {img.size}, expected {st['out_width']}x{st['out_height']}")
        return seconds, st


def workers(d, bootstrap, n, topics):
    procs, ports = [], []
    for i in range(n):
        ports.append(free_port())
        cfg = os.path.join(d, f"w{i}.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
                f'[consumer]\ngroup_id = "{topics["group"]}-{n}"\ntopics = ["{topics["frames"]}"]\n'
                f'[output]\nresults_topic = "{topics["frames"]}.out"\nevents_topic = "{topics["frames"]}.ev"\ndlq_topic = "{topics["frames"]}.dlq"\n'
                f'[worker]\nthreads = 1\n[gpu]\nbackend = "cpu"\n[heartbeat]\nheartbeat_s = 0\n'
                f'[tiles]\nenabled = true\ntopic = "{topics["tiles"]}"\nresults_topic = "{topics["results"]}"\njobs_topic = "{topics["jobs"]}"\n'
                f'[http]\nlisten = "127.0.0.1:{ports[-1]}"\n')
        procs.append(start([binary("framelink-worker"), "run", "--config", cfg], os.path.join(d, f"w{n}-{i}.log"), FRAMELINK__WORKER__ID=f"w{i}"))

    def settled():
        total = 0
        for port in ports:
            try:
                parts = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)).get("partitions") or []
            except OSError:
                return False
            if not parts:
                return False
            total += len(parts)
        return total == 5  # 4 tile partitions + the frames topic's one
    if not wait_until(settled, 90, 0.5):
        stop(procs)
        raise SystemExit(f"{n} worker(s) did not settle (logs in {d})")
    return procs


def large_image_jobs(bootstrap, out_dir, quick):
    run = uuid.uuid4().hex[:8]
    topics = {"tiles": f"bench-jobs-tiles-{run}", "results": f"bench-jobs-tres-{run}", "jobs": f"bench-jobs-jobs-{run}", "frames": f"bench-jobs-frames-{run}", "group": f"bench-jobs-{run}"}
    create_topics(bootstrap, [topics["frames"]], 1)
    sizes, counts, pipelines = ((1024,), (1,), ("sobel",)) if quick else ((1024, 2048, 4096), (1, 2), PIPELINES)
    rows, big = [], None
    with tempfile.TemporaryDirectory() as d:
        # Made here (as the console would) so that the suite deletes them afterwards.
        create_topics(bootstrap, [topics["tiles"], topics["results"]], 4)
        create_topics(bootstrap, [topics["jobs"]], 1, {"cleanup.policy": "compact"})
        console = Console(d, bootstrap, topics)
        try:
            for n in counts:
                procs = workers(d, bootstrap, n, topics)
                try:
                    for size in sizes:
                        png = mosaic(size, d)
                        for p in pipelines:
                            runs = sorted((console.run_job(png, p) for _ in range(1 if quick else REPEATS)), key=lambda r: r[0])
                            seconds, st = runs[len(runs) // 2]  # the median run
                            rows.append((size, n, p, st["tiles"], seconds, st["seconds"]))
                            print(f"  {size}x{size} {p:<10} {n} worker(s): {st['tiles']} tiles in {seconds:.2f} s ({st['tiles'] / seconds:.1f} tiles/s)", flush=True)
                    if n == 2 and not quick:
                        png = mosaic(16384, d)
                        seconds, st = console.run_job(png, "blur:2")
                        big = (st["tiles"], seconds, st["seconds"], vmhwm(console.proc.pid), [vmhwm(w.pid) for w in procs], os.path.getsize(png))
                        print(f"  16384x16384 blur:2 2 workers: {st['tiles']} tiles in {seconds:.1f} s", flush=True)
                finally:
                    stop(procs)
        finally:
            stop([console.proc])
    lo, hi = PUBLISHED
    lines = [
        "Large-image jobs end to end: POST /api/jobs (a PNG of the test photographs) -> tiles with a halo on Kafka -> "
        f"framelink-worker processes ({profile()} build, CPU backend, 1 processing thread each) -> tile results -> stitched by framelink-console -> "
        f"result downloaded as PNG; {TILE}x{TILE} tiles; one job at a time; seconds from the upload's first byte to the result's last, "
        f"the median of {1 if quick else REPEATS} run(s). "
        f"The Python tile pipeline this replaces published {lo}-{hi} tiles/s with 1-2 workers (512x512 tiles). "
        f"Broker, console and workers all on one machine: {machine()}; build: {profile()}.",
        "",
        "| image | workers | pipeline | tiles | seconds (end to end) | tiles/s | vs 0.71 tiles/s | seconds (console: created -> stitched) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, n, p, tiles, seconds, inner in rows:
        lines.append(f"| {size}x{size} | {n} | `{p}` | {tiles} | {seconds:.2f} | {tiles / seconds:.1f} | {tiles / seconds / hi:.0f}x | {inner:.2f} |")
    if big:
        tiles, seconds, inner, console_rss, worker_rss, png_bytes = big
        lines += [
            "",
            f"**16384x16384 (268 Mpx, a {png_bytes / 1e6:.0f} MB PNG), `blur:2`, 2 workers:** {tiles} tiles in {seconds:.1f} s end to end "
            f"({tiles / seconds:.1f} tiles/s; {inner:.1f} s from created to stitched); peak memory (VmHWM): console {console_rss / 2**20:.0f} MiB "
            f"(the upload, the decoded source while its tiles are queued, the stitched result and its PNG), workers "
            + ", ".join(f"{r / 2**20:.0f} MiB" for r in worker_rss) + ".",
        ]
    md = write_table(out_dir, "large-image-jobs.md", lines)
    groups = [f"{s}²" for s in sizes]
    series = {f"{n} worker{'s' if n > 1 else ''} {p}": [next(t / s for (sz, k, q, t, s, _) in rows if sz == size and k == n and q == p) for size in sizes] for n in counts for p in pipelines}
    plot_bars(groups, series, os.path.join(out_dir, "large-image-jobs.png"), f"Large-image jobs, tiles/s end to end ({TILE}² tiles)", "tiles/s")
    return md
