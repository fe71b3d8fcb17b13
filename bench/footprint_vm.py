#!/usr/bin/env python3
"""The aarch64 agent's footprint at 1080p, measured inside an emulated arm64 machine.

bench/footprint.py runs a cross-built agent under qemu-user, where the RSS is qemu's process (an
upper bound); on some machines qemu-user hangs as soon as the agent starts a thread
(docs/deployment.md). This boots a whole arm64 Linux instead — qemu-system-aarch64 (TCG), the
Debian arm64 kernel, a busybox initramfs holding the stripped agent and the arm64 libraries it
links — and reads the agent's own VmRSS from the guest's /proc, so the figure is the agent's
alone, as on a board.

In the guest: one synthetic 1920x1080 camera at 30 fps, spool on the guest's tmpfs, frames sent
to the host's broker through qemu's user network (librdkafka connects to the advertised
127.0.0.1:19092; busybox nc relays that port to the host, 10.0.2.2). Every second the guest
prints the agent's VmRSS, VmHWM, CPU ticks and frames captured / sent / dropped (its /metrics);
after a warm-up this prints one Markdown table row. Emulation is slow: the camera's 30 fps is
not kept (the table says what was), so this measures memory, not speed.

  python3 bench/footprint_vm.py --binary dist/aarch64-unknown-linux-gnu/framelink-agent

Needs: a broker (`scripts/kafka up`), confluent-kafka (creates the topic), qemu-system-arm,
the arm64 libraries the agent links (the cross toolchain's libc6-arm64-cross, libssl3:arm64 —
what `scripts/cross-build` installs), and apt access for the kernel and busybox-static arm64
packages (`apt-get download`, cached in .cache/arm64vm; nothing installed). Not part of CI.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, create_topics, delete_topics  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "arm64vm")
MODULES = "failover net_failover virtio_net virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci"
APPLETS = "sh mount insmod sleep cat awk ip nc kill poweroff mkdir tail tr printf ls wc dd"
LIB_DIRS = ["/usr/aarch64-linux-gnu/lib", "/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu"]
SAMPLE = re.compile(r"SAMPLE t=([\d.]+) rss=(\d+) hwm=(\d+) ticks=(\d+) captured=([\d.e+]+) sent=([\d.e+]+) dropped=([\d.e+]+)")

INIT = r"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in %(modules)s; do insmod /lib/modules/$m.ko; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# librdkafka connects to the address the broker advertises (127.0.0.1:19092): relay it to the host.
nc -ll -p 19092 -e /bin/relay &
sleep 1
echo "GUEST $(cat /proc/meminfo | awk '/MemTotal/ {print $2}') kB, $(cat /proc/cpuinfo | awk '/^processor/ {n++} END {print n}') CPUs"
FRAMELINK_LOG=warn /bin/framelink-agent run --config /agent.toml 2>/tmp/agent.log &
pid=$!
i=0
while [ $i -lt %(seconds)d ]; do
  sleep 1
  i=$((i+1))
  [ -d /proc/$pid ] || { echo "AGENT EXITED"; break; }
  rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
  hwm=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
  ticks=$(awk '{print $14 + $15}' /proc/$pid/stat)
  # (busybox's static wget crashes in this guest; nc does not)
  m=$(printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 5 127.0.0.1 9464 | tr -d '\r')
  c=$(echo "$m" | awk '/^framelink_agent_frames_captured_total/ {s+=$2} END {print s+0}')
  s=$(echo "$m" | awk '/^framelink_agent_frames_sent_total/ {s+=$2} END {print s+0}')
  d=$(echo "$m" | awk '/^framelink_agent_frames_dropped_total/ {s+=$2} END {print s+0}')
  up=$(awk '{print $1}' /proc/uptime)
  echo "SAMPLE t=$up rss=$rss hwm=$hwm ticks=$ticks captured=$c sent=$s dropped=$d"
done
# Where the resident memory is: kB by mapping (the binary, libraries, [heap], anonymous).
echo "SMAPS"
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = (NF >= 6) ? $6 : "[anon]"; range = $1} /^Rss:/ {rss[name] += $2; if ($2 >= 1024 && name == "[anon]") print "  anon " range " " $2 " kB"} END {for (n in rss) if (rss[n] >= 256) print "  " rss[n] " kB " n}' /proc/$pid/smaps
# Each mapping of 128 kB or more resident: its permissions say text (r-xp), relocated data (r--p, rw-p) or heap.
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = (NF >= 6) ? $6 : "[anon]"; perms = $2} /^Rss:/ {if ($2 >= 128) print "  map " perms " " $2 " kB " name}' /proc/$pid/smaps
awk '/^(Rss|Anonymous|Private_Dirty|Shared_Clean|Private_Clean):/' /proc/$pid/smaps_rollup
# Of the large anonymous mappings: how many of their bytes are not zero (zeroed pages touched
# by a memset are resident all the same).
awk '/^[0-9a-f]+-[0-9a-f]+ / {range = $1; anon = (NF < 6)} /^Rss:/ {if (anon && $2 >= 4096) print range}' /proc/$pid/smaps | while read r; do
  a=$((0x${r%%%%-*})); b=$((0x${r##*-}))
  nz=$(dd if=/proc/$pid/mem bs=4096 skip=$((a / 4096)) count=$(((b - a) / 4096)) 2>/dev/null | tr -d '\000' | wc -c)
  echo "  anon $r: $(((b - a) / 1024)) kB mapped, $nz bytes not zero"
done
echo "THREADS $(ls /proc/$pid/task | wc -l)"
kill $pid
sleep 3
echo "AGENT LOG"; tail -n 20 /tmp/agent.log
echo "GUEST DONE"
poweroff -f
"""


def fetch(pkg):
    """The unpacked arm64 package `pkg` (apt-get download, cached)."""
    out = os.path.join(CACHE, pkg.split(":")[0])
    if not os.path.exists(os.path.join(out, ".complete")):
        os.makedirs(CACHE, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["apt-get", "download", pkg], cwd=CACHE, check=True, stdout=subprocess.DEVNULL)
        deb = next(f for f in os.listdir(CACHE) if f.startswith(pkg.split(":")[0] + "_") and f.endswith(".deb"))
        subprocess.run(["dpkg-deb", "-x", os.path.join(CACHE, deb), out], check=True)
        os.remove(os.path.join(CACHE, deb))
        open(os.path.join(out, ".complete"), "w").close()
    return out


def kernel_package():
    deps = subprocess.run(["apt-cache", "depends", "linux-image-arm64:arm64"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"Depends: (linux-image-[0-9][^\s:]*)", deps)
    if not m:
        raise SystemExit("footprint_vm: cannot find the kernel behind linux-image-arm64:arm64 (dpkg --add-architecture arm64; apt-get update)")
    return m.group(1)


def needed(binary):
    out = subprocess.run(["readelf", "-d", binary], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def find_lib(name):
    for d in LIB_DIRS:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise SystemExit(f"footprint_vm: the arm64 {name} is not in {LIB_DIRS} (install the cross toolchain / the :arm64 package)")


def initramfs(work, binary, kdir, kver, bb, seconds, topic, fps):
    root = os.path.join(work, "root")
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib/modules", "lib64"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy(os.path.join(bb, "bin", "busybox"), os.path.join(root, "bin", "busybox"))
    for a in APPLETS.split():
        os.symlink("busybox", os.path.join(root, "bin", a))
    shutil.copy(binary, os.path.join(root, "bin", "framelink-agent"))
    libs = set(needed(binary))
    # Each library's own dependencies too (libssl needs libcrypto, libstdc++ libgcc_s, ...).
    todo = list(libs)
    while todo:
        for dep in needed(find_lib(todo.pop())):
            if dep not in libs:
                libs.add(dep)
                todo.append(dep)
    for lib in libs:
        shutil.copy(find_lib(lib), os.path.join(root, "lib", lib))
    for m in MODULES.split():
        src = subprocess.run(["find", os.path.join(kdir, "lib", "modules", kver), "-name", f"{m}.ko*"], check=True, capture_output=True, text=True).stdout.split()
        if not src:
            raise SystemExit(f"footprint_vm: module {m} is not in the kernel package")
        dst = os.path.join(root, "lib", "modules", f"{m}.ko")
        if src[0].endswith(".xz"):
            with open(dst, "wb") as f:
                subprocess.run(["xz", "-dc", src[0]], check=True, stdout=f)
        else:
            shutil.copy(src[0], dst)
    with open(os.path.join(root, "bin", "relay"), "w") as f:
        f.write("#!/bin/sh\nexec nc 10.0.2.2 19092\n")
    with open(os.path.join(root, "init"), "w") as f:
        f.write(INIT % {"modules": MODULES, "seconds": seconds})
    with open(os.path.join(root, "agent.toml"), "w") as f:
        f.write('[device]\nid = "bench-footprint-vm"\n[kafka]\nbrokers = "127.0.0.1:19092"\nsecurity_protocol = "PLAINTEXT"\n'
                '[[cameras]]\nid = "cam0"\nsynthetic = { width = 1920, height = 1080, fps = %(fps)d }\n'
                f'[spool]\ndir = "/tmp/spool"\n[forwarder]\ntopic = "{topic}"\n[http]\nlisten = "127.0.0.1:9464"\n'
                '[heartbeat]\nheartbeat_s = 0\n' % {"fps": fps})
    for p in ["init", "bin/relay"]:
        os.chmod(os.path.join(root, p), 0o755)
    out = os.path.join(work, "initramfs.cpio")
    files = subprocess.run("find . | sort", shell=True, cwd=root, check=True, capture_output=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "dist", "aarch64-unknown-linux-gnu", "framelink-agent"))
    ap.add_argument("--bootstrap", default="127.0.0.1:19092", help="the host's broker, for the topic (the guest relays 127.0.0.1:19092 to the host's port 19092: the broker must advertise that)")
    ap.add_argument("--seconds", type=int, default=90, help="samples the guest takes, about one a second (a little more under emulation)")
    ap.add_argument("--warmup", type=int, default=30, help="seconds after the first frame sent before sampling")
    ap.add_argument("--fps", type=int, default=30, help="the camera's rate (emulation keeps a few frames/s of 1080p)")
    ap.add_argument("--thp", choices=["always", "madvise", "never"], help="the guest kernel's transparent huge pages (default: the kernel's, always on Debian)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", default="1024M")
    ap.add_argument("--label", default="")
    ap.add_argument("--verbose", action="store_true", help="also print where the resident memory is (smaps)")
    ap.add_argument("--timeline", action="store_true", help="also print every sample (time, VmRSS, VmHWM, frames): when the peak was reached")
    ap.add_argument("--out")
    a = ap.parse_args()

    kpkg = kernel_package()
    kver = kpkg[len("linux-image-"):]
    kdir = fetch(kpkg + ":arm64")
    bb = fetch("busybox-static:arm64")
    topic = f"bench-footprint-vm-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as work:
        create_topics(a.bootstrap, [topic], 1)
        try:
            cpio = initramfs(work, a.binary, kdir, kver, bb, a.seconds, topic, a.fps)
            cmd = ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72", "-smp", str(a.cpus), "-m", a.memory,
                   "-kernel", os.path.join(kdir, "boot", f"vmlinuz-{kver}"), "-initrd", cpio,
                   "-append", "console=ttyAMA0 rdinit=/init quiet panic=-1" + (f" transparent_hugepage={a.thp}" if a.thp else ""), "-netdev", "user,id=n0",
                   "-device", "virtio-net-pci,netdev=n0", "-nographic", "-no-reboot"]
            try:
                console = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=a.seconds * 3 + 300).stdout
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                raise SystemExit(f"footprint_vm: the guest did not finish in time:\n{out[-3000:]}")
        finally:
            delete_topics(a.bootstrap, [topic])
    if "AGENT EXITED" in console:
        raise SystemExit(f"footprint_vm: the agent exited in the guest:\n{console[-3000:]}")
    samples = [tuple(float(x) for x in m.groups()) for m in SAMPLE.finditer(console)]
    guest = re.search(r"GUEST (\d+) kB, (\d+) CPUs", console)
    tail = console[-3000:]
    first = next((s[0] for s in samples if s[5] > 0), None)
    if first is None:
        raise SystemExit(f"footprint_vm: the agent sent nothing in the guest:\n{tail}")
    window = [s for s in samples if s[0] >= first + a.warmup]
    if len(window) < 5:
        raise SystemExit(f"footprint_vm: too few samples after the warm-up ({len(window)}); raise --seconds:\n{tail}")
    secs = window[-1][0] - window[0][0]
    rss = [s[1] / 1024 for s in window]
    hwm = window[-1][2] / 1024
    cpu = (window[-1][3] - window[0][3]) / 100 / secs * 100
    captured = (window[-1][4] - window[0][4]) / secs
    sent = (window[-1][5] - window[0][5]) / secs
    dropped = window[-1][6] - window[0][6]
    size = os.path.getsize(a.binary)
    label = a.label or os.path.relpath(a.binary, ROOT)
    head = ("| binary | MB on disk | frames/s captured | frames/s sent | CPU % of a vCPU | RSS MiB median | RSS MiB max | "
            "peak RSS (VmHWM) MiB | frames dropped (window) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    row = (f"| {label} | {size / 1e6:.1f} | {captured:.1f} | {sent:.1f} | {cpu:.0f} | {statistics.median(rss):.1f} | "
           f"{max(rss):.1f} | {hwm:.1f} | {dropped:.0f} |")
    print(f"guest: arm64 {kver}, {guest.group(2) if guest else '?'} vCPUs (cortex-a72, TCG), "
          f"{int(guest.group(1)) // 1024 if guest else '?'} MiB; {len(window)} samples over {secs:.0f} s after a {a.warmup} s warm-up")
    print(head)
    print(row)
    if a.timeline:
        print("samples (s after the first frame sent, VmRSS MiB, VmHWM MiB, captured, sent, dropped):")
        for s in samples:
            print(f"  {s[0] - first:7.1f} {s[1] / 1024:6.1f} {s[2] / 1024:6.1f} {s[4]:6.0f} {s[5]:6.0f} {s[6]:4.0f}")
    if a.verbose:
        m = re.search(r"SMAPS\n(.*?)AGENT LOG", console, re.S)
        print("resident memory at the end:\n" + (m.group(1) if m else "(no smaps)"))
    if a.out:
        with open(a.out, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
