"""Helpers shared by the benchmark suite's experiments (bench/suite.py): the machine, the local
broker, frames made from the test photographs, topics, running framelink binaries, sampling
their /metrics, and progress counted from topic watermarks."""

import os
import platform
import socket
import subprocess
import time
import urllib.request

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "testdata", "images")
QUIET_BROKER_LOGS = {"log_level": 3}


def profile():
    return os.environ.get("FRAMELINK_BENCH_PROFILE", "release")


def binary(name):
    return os.path.join(ROOT, "target", profile(), name)


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def broker():
    env = subprocess.run([os.path.join(ROOT, "scripts", "kafka"), "env"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in env.split() if "=" in line)["FRAMELINK_BOOTSTRAP"]


def frames(out_dir, width, height, quality=85):
    """The test photographs as width x height JPEGs, made once; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in sorted(os.listdir(IMAGES)):
        if not name.lower().endswith((".jpg", ".png")):
            continue
        dst = os.path.join(out_dir, f"{os.path.splitext(name)[0]}-{width}x{height}.jpg")
        if not os.path.exists(dst):
            Image.open(os.path.join(IMAGES, name)).convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(dst, "JPEG", quality=quality)
        paths.append(dst)
    return paths


# Topics made by the experiments, deleted by `delete_topics()`: a full run writes tens of GB of
# frames, which must not pile up in the broker's data directory.
_created = set()


def create_topics(bootstrap, names, partitions, config=None):
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET_BROKER_LOGS})
    for f in admin.create_topics([NewTopic(n, partitions, 1, config=config or {}) for n in names]).values():
        f.result(30)
    _created.update(names)


def delete_topics(bootstrap, names=None):
    """Deletes `names`, or every topic this run created (and those it produced to, passed in)."""
    from confluent_kafka.admin import AdminClient
    names = sorted(set(names) if names is not None else _created)
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET_BROKER_LOGS})
    for name, f in admin.delete_topics(names, operation_timeout=30).items():
        try:
            f.result(60)
        except Exception as e:  # noqa: BLE001 — already gone is fine; anything else is reported
            if "UNKNOWN_TOPIC" not in str(e):
                print(f"  (could not delete topic {name}: {e})", flush=True)
        _created.discard(name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_metrics(port):
    """Prometheus text of a framelink binary's /metrics as {name{labels}: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def metric(m, name, *filters):
    """Sum of every sample of `name` whose labels contain each filter (`'camera="cam0"'`); 0
    when there is none. The same rule as scripts/lib.sh's `metric` and the Rust test kit's
    `Daemon::metric`."""
    return sum(v for k, v in m.items() if k.split("{", 1)[0] == name and all(f in k for f in filters))


class Watermarks:
    """Records in a topic so far (sum of its partitions' high watermarks)."""

    def __init__(self, bootstrap):
        from confluent_kafka import Consumer
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks", "enable.auto.commit": False, **QUIET_BROKER_LOGS})

    def total(self, topic, partitions):
        from confluent_kafka import TopicPartition
        return sum(self.c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] for p in range(partitions))

    def close(self):
        self.c.close()


def worker_toml(path, bootstrap, group, topic, results, pipeline, threads, http_port=None):
    with open(path, "w") as f:
        f.write(
            f'[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
            f'[consumer]\ngroup_id = "{group}"\ntopics = ["{topic}"]\nauto_offset_reset = "earliest"\n'
            f'[output]\nresults_topic = "{results}"\nevents_topic = "{results}.events"\ndlq_topic = "{results}.dlq"\n'
            f'[worker]\npipeline = "{pipeline}"\nthreads = {threads}\nmax_pixels = 100000000\n'
            f'[gpu]\nbackend = "cpu"\n'
            f'[http]\nlisten = "{f"127.0.0.1:{http_port}" if http_port else ""}"\n')


def start(cmd, log_path, **env):
    e = dict(os.environ, FRAMELINK_LOG="warn", **env)
    return subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))


def stop(procs, timeout=60):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def plot_lines(series, path, title, xlabel, ylabel):
    """series: {label: ([x...], [y...])} as one line each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(groups, series, path, title, ylabel):
    """groups: x labels; series: {label: [value per group]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(5, len(groups) * 1.4), 4))
    w = 0.8 / max(1, len(series))
    for j, (label, vals) in enumerate(series.items()):
        ax.bar([i + j * w for i in range(len(groups))], vals, w, label=label)
    ax.set_xticks([i + w * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(out_dir, name, lines):
    """Writes an experiment's markdown (`lines`) to out_dir/name, prints it, returns the path."""
    md = os.path.join(out_dir, name)
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md


def wait_until(cond, timeout, interval=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False
