"""4. Edge path of the benchmark suite (run by bench/suite.py):

a. raw libjpeg-turbo encode vs the agent (source -> encode -> Kafka acknowledgement), frames/s,
   from the agent's own release bench (`cargo bench -p framelink-agent --bench edge_pipeline`;
   full run only: it needs a release build of the bench);
   then the agent fed YUYV and NV12 camera buffers on one core (taskset -c 0) next to the usual
   Python loop on the same buffers and core (bench/pillow_producer.py: OpenCV colour conversion,
   Pillow JPEG, confluent-kafka), frames/s acknowledged, in 3 alternating rounds compared by
   their medians (issue #19 item 3);
b. the real `framelink-agent` with one synthetic 1920x1080 camera at 30 fps: CPU and RSS while
   live, then two outages (60 s each; 5 s with --quick; see OUTAGES): the broker paused and
   resumed (a dark uplink), then stopped and started again — for each, frames spooled
   meanwhile, the time to the first frame sent, and the backlog's drain rate against the live
   rate, from the agent's /metrics sampled every half second (every 0.1 s while it drains).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from benchlib import (ROOT, binary, create_topics, free_port, get_metrics, machine, metric, plot_lines, profile, start, stop, wait_until,
                      write_table)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


ROUNDS = 3  # one-core comparison: agent and Python rounds alternate, medians compared


def _python_one_core(bootstrap, fmt, dump):
    topic = f"bench-pillow-{fmt}-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic], 1)
    py = subprocess.run(["taskset", "-c", "0", sys.executable, os.path.join(ROOT, "bench", "pillow_producer.py"), "--bootstrap", bootstrap,
                         "--topic", topic, "--format", fmt, "--dir", dump], capture_output=True, text=True)
    if py.returncode != 0:
        raise SystemExit(f"pillow_producer failed:\n{py.stderr[-3000:]}")
    return json.loads(py.stdout.strip().splitlines()[-1])


def _agent_one_core(bench_exe, fmt):
    """The bench's agent phase on its own, as the bench runs it: taskset -c 0, PLAINTEXT."""
    out = subprocess.run(["taskset", "-c", "0", bench_exe], capture_output=True, text=True,
                         env=dict(os.environ, FRAMELINK_BENCH_PHASE="agent", FRAMELINK_BENCH_FORMAT=fmt, FRAMELINK_BENCH_PLAINTEXT="1"))
    fields = (out.stdout.strip().splitlines() or [""])[-1].split()
    if out.returncode != 0 or len(fields) != 4:
        raise SystemExit(f"edge_pipeline agent phase ({fmt}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return float(fields[0])


def _bench_executable():
    """The edge_pipeline bench's executable (just built by `cargo bench`), for the later rounds."""
    out = subprocess.run(["cargo", "bench", "--locked", "--no-run", "--message-format=json", "-p", "framelink-agent", "--bench", "edge_pipeline"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "edge_pipeline" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("edge path: cargo did not name the edge_pipeline bench's executable")


def _encode_vs_agent(bootstrap):
    with tempfile.TemporaryDirectory() as dump:
        out = subprocess.run(["cargo", "bench", "--locked", "-q", "-p", "framelink-agent", "--bench", "edge_pipeline"], cwd=ROOT, capture_output=True,
                             text=True, env=dict(os.environ, FRAMELINK_BENCH_DUMP=dump))
        if out.returncode != 0:
            raise SystemExit(f"edge_pipeline bench failed:\n{out.stderr[-3000:]}")
        text = out.stdout
        grab = lambda pat: re.search(pat, text).group(1)
        bench_exe = _bench_executable()
        res = {
            "raw": float(grab(r"raw turbojpeg encode[^|]*\| ([\d.]+)")),
            "agent": float(grab(r"agent: source[^|]*\| ([\d.]+)")),
            "rss": float(grab(r"agent peak RSS: ([\d.]+) MiB")),
            "jpeg": grab(r"JPEG (q\d+ 4:2:0 \(avg \d+ KB\))"),
            "per_core": {},
            "rounds": ROUNDS,
        }
        # Round 1's agent figure comes from the bench itself; then Python and the agent
        # alternate, so a drift of the shared machine hits both sides alike.
        rounds = {fmt: ([float(grab(rf"agent one core {fmt} \| ([\d.]+)"))], [], []) for fmt in ("yuyv", "nv12")}
        for r in range(res["rounds"]):
            for fmt, (agent, python, kb) in rounds.items():
                if r > 0:
                    agent.append(_agent_one_core(bench_exe, fmt))
                py = _python_one_core(bootstrap, fmt, dump)
                python.append(py["frames_per_s"])
                kb.append(py["avg_jpeg_bytes"] / 1000)
                print(f"  {fmt} on one core, round {r + 1}: agent {agent[-1]:.1f} frames/s, Pillow + confluent-kafka {python[-1]:.1f} = "
                      f"{agent[-1] / python[-1]:.2f}x", flush=True)
        for fmt, (agent, python, kb) in rounds.items():
            a, p = statistics.median(agent), statistics.median(python)
            res["per_core"][fmt] = (a, p, statistics.median(kb), [x / y for x, y in zip(agent, python)])
            print(f"  {fmt} on one core, median of {len(agent)}: agent {a:.1f} frames/s, Pillow + confluent-kafka {p:.1f} = {a / p:.2f}x "
                  f"(Pillow's JPEGs avg {statistics.median(kb):.0f} KB)", flush=True)
    return res


# The two outages, in this order, each followed by its drain:
# - `paused`: the broker frozen (SIGSTOP) and resumed (SIGCONT) — what an edge device sees when
#   its uplink goes dark: connections stay open and nothing answers (the agent notices through
#   its stall timeout), while the cloud broker stays warm (first, so that it is);
# - `restart`: the broker stopped (SIGTERM) and started again — the agent's connections are
#   refused, and the drain meets a broker JVM that is starting cold (JIT, GC, page cache) on the
#   machine it shares with the agent.
OUTAGES = {"paused": "link dark (broker paused)", "restart": "broker restarted"}


def _outage(kind, kafka, sample, timeline, outage_s, drain_limit):
    """One outage and the drain after it, from the agent's metrics sampled into `timeline`."""
    t_down = time.time()
    subprocess.run([kafka, "down" if kind == "restart" else "pause"], check=True, capture_output=True)
    while time.time() - t_down < outage_s:
        time.sleep(0.5)
        try:
            sample()
        except OSError:
            pass
    backlog = timeline[-1][2]
    subprocess.run([kafka, "up" if kind == "restart" else "resume"], check=True, capture_output=True)
    t_up = time.time()
    sent_up = timeline[-1][1]
    first_send = sent_first = None
    # Every 0.1 s: the drain of a 60 s backlog takes a few seconds.
    while time.time() - t_up < drain_limit:
        time.sleep(0.1)
        sample()
        if first_send is None and timeline[-1][1] > sent_up:
            first_send = time.time() - t_up
            sent_first = timeline[-1][1]
        if timeline[-1][2] == 0 and first_send is not None:
            break
    drained_s = time.time() - t_up
    # From the first sample that saw frames sent (those sent before it not counted); none
    # when that sample already found the spool empty.
    sending_rate = ((timeline[-1][1] - sent_first) / (drained_s - first_send)
                    if first_send is not None and timeline[-1][1] > sent_first else float("nan"))
    return dict(backlog=backlog, first_send=first_send, drained_s=drained_s, drain_rate=(timeline[-1][1] - sent_up) / drained_s,
                sending_rate=sending_rate, spool_left=timeline[-1][2])


def edge_path(bootstrap, out_dir, quick):
    live_s, outage_s, drain_limit = (3, 5, 60) if quick else (15, 60, 180)
    kafka = os.path.join(ROOT, "scripts", "kafka")
    res = {} if quick else _encode_vs_agent(bootstrap)
    run = uuid.uuid4().hex[:8]
    topic = f"bench-edge-{run}"
    create_topics(bootstrap, [topic], 1)
    port = free_port()
    timeline = []  # (t, frames sent, spool records)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/agent.toml", "w") as f:
            f.write(f'[device]\nid = "bench-edge"\n[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
                    f'[[cameras]]\nid = "cam0"\nsynthetic = {{ width = 1920, height = 1080, fps = 30 }}\n'
                    f'[spool]\ndir = "{d}/spool"\nmax_bytes = "4 GiB"\n[forwarder]\ntopic = "{topic}"\n[http]\nlisten = "127.0.0.1:{port}"\n')
        a = start([binary("framelink-agent"), "run", "--config", f"{d}/agent.toml"], f"{d}/agent.log")
        t0 = time.time()
        def sample():
            m = get_metrics(port)
            timeline.append((time.time() - t0, metric(m, "framelink_agent_frames_sent_total"), metric(m, "framelink_agent_spool_records")))

        def sending():
            try:
                sample()
            except OSError:
                return False  # its HTTP server is not up yet
            return timeline[-1][1] > 0

        try:
            if not wait_until(sending, 60, 0.5):
                raise SystemExit(f"edge path: the agent sent nothing in 60 s (log in {d}/agent.log)")
            # Live: CPU and RSS at 1080p30.
            time.sleep(2)
            sample()
            c0, w0, s0 = _cpu_seconds(a.pid), time.time(), timeline[-1][1]
            rss = []
            while time.time() - w0 < live_s:
                time.sleep(0.5)
                sample()
                rss.append(_rss_mib(a.pid))
            cpu = (_cpu_seconds(a.pid) - c0) / (time.time() - w0) * 100
            live_rate = (timeline[-1][1] - s0) / (timeline[-1][0] - timeline[-len(rss) - 1][0])
            outages = {kind: _outage(kind, kafka, sample, timeline, outage_s, drain_limit) for kind in OUTAGES}
        finally:
            # Whatever happened, leave the broker up, and running (a paused one answers nothing)
            # before the agent stops (its shutdown waits for acknowledgements).
            subprocess.run([kafka, "resume"], capture_output=True)
            stop([a])
            subprocess.run([kafka, "up"], capture_output=True)
    res.update(live_rate=live_rate, cpu=cpu, rss_med=statistics.median(rss), rss_max=max(rss), outages=outages)
    print(f"  live {live_rate:.1f} fps, CPU {cpu:.0f} % of a core, RSS {res['rss_med']:.0f} MiB", flush=True)
    for kind, o in outages.items():
        print(f"  {OUTAGES[kind]}, {outage_s} s: spooled {o['backlog']:.0f} frames; frames sent again after {o['first_send'] or float('nan'):.1f} s, "
              f"spool empty after {o['drained_s']:.1f} s ({o['spool_left']:.0f} left), draining at {o['drain_rate']:.1f} frames/s = "
              f"{o['drain_rate'] / live_rate:.1f}x live ({o['sending_rate']:.1f} frames/s from the first send)", flush=True)
    png = os.path.join(out_dir, "edge-outage.png")
    ts = [t for t, _, _ in timeline]
    rate = [0.0] + [(timeline[i][1] - timeline[i - 1][1]) / max(1e-3, timeline[i][0] - timeline[i - 1][0]) for i in range(1, len(timeline))]
    plot_lines({"frames sent per second": (ts, rate), "frames in the spool / 10": (ts, [s / 10 for _, _, s in timeline])}, png,
               f"Agent, one 1080p30 camera: two {outage_s} s outages (broker paused, then restarted) and the drains", "seconds since the agent started", "frames")
    lines = [f"Edge path: framelink-agent ({profile()}) with one synthetic 1920x1080 camera at 30 fps, PLAINTEXT to the local broker, spool on local "
             f"disk; machine: {machine()}. Plot: edge-outage.png.", "", "| measurement | value |", "| --- | ---: |"]
    if "raw" in res:
        lines += [f"| raw turbojpeg encode, 1 thread, 1080p {res['jpeg']} (frames/s) | {res['raw']:.1f} |",
                  f"| agent: source → encode → Kafka ack, 1 camera offering 1000 frames/s, mTLS (frames/s) | {res['agent']:.1f} |",
                  f"| **agent / raw encode** | **{res['agent'] / res['raw']:.2f}** |",
                  f"| agent peak RSS in that run (MiB) | {res['rss']:.1f} |"]
        for fmt, (agent, python, kb, ratios) in res["per_core"].items():
            each = ", ".join(f"{x:.2f}" for x in ratios)
            lines += [f"| {fmt.upper()} 1080p buffers, one core, PLAINTEXT: agent / Pillow + confluent-kafka, q80 4:2:0 (Pillow avg {kb:.0f} KB), "
                      f"medians of {res['rounds']} alternating rounds (frames/s; each round's ratio: {each}) | {agent:.1f} / {python:.1f} = **{agent / python:.2f}x** |"]
    lines += [f"| live rate at 1080p30 (frames/s sent) | {live_rate:.1f} |",
              f"| agent CPU at 1080p30 (% of one core, over {live_s} s) | {cpu:.0f} |",
              f"| agent RSS at 1080p30 (MiB, median / max) | {res['rss_med']:.0f} / {res['rss_max']:.0f} |"]
    for kind, o in outages.items():
        what = OUTAGES[kind]
        first = "never" if o["first_send"] is None else f"{o['first_send']:.1f}"
        lines += [f"| {what}: frames in the spool after {outage_s} s | {o['backlog']:.0f} |",
                  f"| {what}: first frame sent after the broker is back (s) | {first} |",
                  f"| {what}: spool empty after (s) | {o['drained_s']:.1f} |",
                  f"| {what}: frames sent per second while draining (backlog + live), from the broker back | {o['drain_rate']:.1f} |",
                  f"| {what}: the same from the first frame sent | {o['sending_rate']:.1f} |",
                  f"| **{what}: drain rate / live rate** | **{o['drain_rate'] / live_rate:.1f}x** |"]
    return write_table(out_dir, "edge-path.md", lines)
