"""6. RTSP ingest of the benchmark suite (run by bench/suite.py): an H.264 IP camera turned into
JPEG frames, by framelink-agent and by the usual tools, side by side in one run.

A 1920x1080 25 fps H.264 clip (x264, B-frames, an IDR a second; 320x240 with --quick) is made
once by GStreamer and served in real time by tests/rtsp/server.py (`--file`: no encoding on
the server, each client gets the clip from its start over RTSP/TCP). Each client runs alone
for the same number of seconds; measured: frames delivered, CPU seconds (user + system, from
/proc, children included) per delivered frame, peak RSS.

- framelink-agent, `rtsp = { fps = 5 }`, at the camera's rate, and `keyframes_only`: decode
  (libavcodec, one thread; and openh264, the default build's decoder, at 5 fps and every
  frame), JPEG from the I420 planes, *and* the Kafka producer to the local broker (frames
  acknowledged) — the others only write files;
- ffmpeg: `ffmpeg -rtsp_transport tcp -i URL [-r 5] -q:v 3 out%05d.jpg` (libavcodec,
  multithreaded decode);
- GStreamer: `rtspsrc ! rtph264depay ! h264parse ! avdec_h264 [! videorate ! 5/1] ! jpegenc !
  multifilesink`.
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

from benchlib import ROOT, binary, create_topics, free_port, get_metrics, machine, metric, write_table

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER = os.path.join(ROOT, "tests", "rtsp", "server.py")


def _cpu_seconds_tree(pid):
    """utime + stime of `pid` and of its children already reaped (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def _rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _make_clip(path, width, height, seconds):
    if os.path.exists(path):
        return
    frames = seconds * 25
    cmd = (f"gst-launch-1.0 -q videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width={width},height={height},framerate=25/1 ! "
           f"videoconvert ! x264enc speed-preset=veryfast bframes=2 b-adapt=false key-int-max=25 bitrate=4000 ! video/x-h264,profile=main ! "
           f"mp4mux ! filesink location={path}")
    subprocess.run(cmd.split(" "), check=True)


def _measure(cmd, seconds, delivered, env=None, cwd=None):
    """Runs `cmd` for `seconds`, sampling RSS; returns (frames, cpu s, peak RSS MiB)."""
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, cpu = 0.0, 0.0
    t_end = time.time() + seconds
    while time.time() < t_end and p.poll() is None:
        peak = max(peak, _rss_mib(p.pid))
        cpu = _cpu_seconds_tree(p.pid)
        time.sleep(0.25)
    frames = delivered()
    try:
        cpu = _cpu_seconds_tree(p.pid)
    except OSError:
        pass
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
    return frames, cpu, peak


def rtsp_ingest(bootstrap, out_dir, quick):
    width, height, seconds = (320, 240, 4) if quick else (1920, 1080, 20)
    clip_dir = os.path.join(ROOT, "target", "bench-rtsp")
    os.makedirs(clip_dir, exist_ok=True)
    clip = os.path.join(clip_dir, f"clip-{width}x{height}-{seconds + 10}s.mp4")
    _make_clip(clip, width, height, seconds + 10)
    port = free_port()
    server = subprocess.Popen([SERVER, "--port", str(port), "--file", clip], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if not server.stdout.readline().startswith("ready"):
        raise SystemExit("tests/rtsp/server.py did not start")
    url = f"rtsp://127.0.0.1:{port}/file"
    rows = []
    try:
        agent = binary("framelink-agent")
        # scripts/bench-suite builds the agent with libavcodec (feature `libav`): both decoders.
        for label, extra in (("framelink-agent, fps = 5", ', fps = 5, decoder = "libav"'), ("framelink-agent, every frame", ', decoder = "libav"'),
                             ("framelink-agent, keyframes_only", ', keyframes_only = true, decoder = "libav"'),
                             ("framelink-agent (openh264), fps = 5", ', fps = 5, decoder = "openh264"'),
                             ("framelink-agent (openh264), every frame", ', decoder = "openh264"')):
            topic = f"bench-rtsp-{uuid.uuid4().hex[:8]}"
            create_topics(bootstrap, [topic], 1)
            http = free_port()
            with tempfile.TemporaryDirectory() as d:
                cfg = os.path.join(d, "agent.toml")
                with open(cfg, "w") as f:
                    f.write(f'[device]\nid = "bench"\n[kafka]\nbrokers = "{bootstrap}"\nsecurity_protocol = "PLAINTEXT"\n'
                            f'[[cameras]]\nid = "cam"\nrtsp = {{ url = "{url}"{extra} }}\n'
                            f'[encoder]\nthreads = 1\n[spool]\ndir = "{d}/spool"\n[forwarder]\ntopic = "{topic}"\n'
                            f'[http]\nlisten = "127.0.0.1:{http}"\n')
                sent = lambda: metric(get_metrics(http), "framelink_agent_frames_sent_total")
                rows.append((label, *_measure([agent, "run", "--config", cfg], seconds, sent, env=dict(os.environ, FRAMELINK_LOG="warn"))))
        ffmpeg = shutil.which("ffmpeg")
        gst = shutil.which("gst-launch-1.0")
        for label, rate in (("ffmpeg -r 5", ["-r", "5"]), ("ffmpeg, every frame", [])):
            if not ffmpeg:
                continue
            with tempfile.TemporaryDirectory() as d:
                count = lambda: len(os.listdir(d))
                cmd = [ffmpeg, "-loglevel", "error", "-rtsp_transport", "tcp", "-i", url, *rate, "-q:v", "3", os.path.join(d, "out%05d.jpg")]
                rows.append((label, *_measure(cmd, seconds, count)))
        for label, rate in (("GStreamer, videorate 5/1", "! videorate ! video/x-raw,framerate=5/1 "), ("GStreamer, every frame", "")):
            if not gst:
                continue
            with tempfile.TemporaryDirectory() as d:
                count = lambda: len(os.listdir(d))
                pipeline = (f"rtspsrc location={url} protocols=tcp ! rtph264depay ! h264parse ! avdec_h264 {rate}! videoconvert ! jpegenc quality=85 ! "
                            f"multifilesink location={d}/%05d.jpg")
                rows.append((label, *_measure([gst, "-q", *pipeline.split(" ")], seconds, count)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    base = {r[0]: r for r in rows}
    lines = [f"# RTSP ingest: {width}x{height} 25 fps H.264 → JPEG, {seconds} s per client", "",
             f"Machine: {machine()}. One client at a time against tests/rtsp/server.py serving an x264 clip "
             "(B-frames, an IDR a second) over RTSP/TCP. CPU = user + system of the process (children included). "
             "framelink-agent also produces every frame to the local Kafka broker (acknowledged); ffmpeg and GStreamer only write JPEG files. "
             "framelink-agent decodes with libavcodec (`decoder = \"libav\"`, the `libav` build) unless the row says openh264 (the default build's decoder).", "",
             "| client | frames delivered | CPU s | CPU ms / frame | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    for label, frames, cpu, rss in rows:
        per = f"{1000 * cpu / frames:.1f}" if frames else "–"
        lines.append(f"| {label} | {frames:.0f} | {cpu:.2f} | {per} | {rss:.0f} |")
    ratios = []
    for mine, theirs in (("framelink-agent, fps = 5", "ffmpeg -r 5"), ("framelink-agent, fps = 5", "GStreamer, videorate 5/1"),
                         ("framelink-agent, every frame", "ffmpeg, every frame"), ("framelink-agent, every frame", "GStreamer, every frame"),
                         ("framelink-agent, fps = 5", "framelink-agent (openh264), fps = 5"),
                         ("framelink-agent, every frame", "framelink-agent (openh264), every frame")):
        a, b = base.get(mine), base.get(theirs)
        if a and b and a[1] and b[1] and b[2]:
            ratios.append(f"- {mine} vs {theirs}: {(a[2] / a[1]) / (b[2] / b[1]):.2f}x the CPU per frame")
    k, f5 = base.get("framelink-agent, keyframes_only"), base.get("framelink-agent, every frame")
    if k and f5 and k[2]:
        ratios.append(f"- keyframes_only vs every frame: {f5[2] / max(k[2], 1e-9):.1f}x less CPU in total ({k[1]:.0f} vs {f5[1]:.0f} frames)")
    lines += [""] + ratios
    return write_table(out_dir, "rtsp-ingest.md", lines)
