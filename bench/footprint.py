#!/usr/bin/env python3
"""The agent's footprint at 1080p30: one synthetic 1920x1080 camera at 30 fps sent to the broker
(PLAINTEXT) for `--seconds`, sampling the process's VmRSS every half second after a warm-up, and
its CPU time. The binary may be a cross build run under qemu-user (`--runner`): then the RSS is
qemu's process, which holds the guest's memory *and* qemu's own (its translated code and the
mapped guest binary), an upper bound of what the agent needs on the board.

Prints one Markdown table row per run and, with --out, appends it to that file:

  python3 bench/footprint.py --binary target/release/framelink-agent
  python3 bench/footprint.py --binary dist/aarch64-unknown-linux-gnu/framelink-agent \\
      --runner "qemu-aarch64-static -L /usr/aarch64-linux-gnu"

Needs a broker (`scripts/kafka up`: 127.0.0.1:19092) and confluent-kafka (creates the topic).
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import create_topics, delete_topics, free_port, get_metrics, metric, wait_until  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--runner", default="", help="e.g. 'qemu-aarch64-static -L /usr/aarch64-linux-gnu'")
    ap.add_argument("--bootstrap", default="127.0.0.1:19092")
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    a = ap.parse_args()

    topic = f"bench-footprint-{uuid.uuid4().hex[:8]}"
    port = free_port()
    p = None
    with tempfile.TemporaryDirectory() as d, open(f"{d}/agent.log", "w") as log:
        try:
            create_topics(a.bootstrap, [topic], 1)
            with open(f"{d}/agent.toml", "w") as f:
                f.write(f'[device]\nid = "bench-footprint"\n[kafka]\nbrokers = "{a.bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
                        f'[[cameras]]\nid = "cam0"\nsynthetic = {{ width = 1920, height = 1080, fps = 30 }}\n'
                        f'[spool]\ndir = "{d}/spool"\n[forwarder]\ntopic = "{topic}"\n[http]\nlisten = "127.0.0.1:{port}"\n')
            cmd = shlex.split(a.runner) + [a.binary, "run", "--config", f"{d}/agent.toml"]
            p = subprocess.Popen(cmd, env=dict(os.environ, FRAMELINK_LOG="warn"), stdout=subprocess.DEVNULL, stderr=log)

            def agent_log():
                log.flush()
                with open(f"{d}/agent.log") as f:
                    return f.read()[-3000:]

            def alive():
                if p.poll() is not None:
                    raise SystemExit(f"footprint: the agent exited ({p.returncode}):\n{agent_log()}")

            def sent():
                alive()
                try:
                    return metric(get_metrics(port), "framelink_agent_frames_sent_total")
                except OSError:
                    return 0
            if not wait_until(lambda: sent() > 0, 120, 0.5):
                raise SystemExit(f"footprint: the agent sent nothing in 120 s:\n{agent_log()}")
            time.sleep(a.warmup)
            c0, t0, s0 = cpu_seconds(p.pid), time.time(), sent()
            rss = []
            while time.time() - t0 < a.seconds:
                time.sleep(0.5)
                alive()
                rss.append(rss_mib(p.pid))
            cpu = (cpu_seconds(p.pid) - c0) / (time.time() - t0) * 100
            rate = (sent() - s0) / (time.time() - t0)
            dropped = metric(get_metrics(port), "framelink_agent_frames_dropped_total")
        finally:
            if p is not None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            delete_topics(a.bootstrap, [topic])
    size = os.path.getsize(a.binary)
    label = a.label or os.path.relpath(a.binary)
    row = (f"| {label} | {size / 1e6:.1f} | {rate:.1f} | {cpu:.0f} | {statistics.median(rss):.1f} | {max(rss):.1f} | "
           f"{dropped:.0f} |")
    print("| binary | MB on disk | frames/s sent | CPU % of a core | RSS MiB median | RSS MiB max | frames dropped |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(row)
    if a.out:
        with open(a.out, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
