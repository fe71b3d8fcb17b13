#!/bin/sh
# /init of the power-cut test VM (tests/vm/powercut fills in @MODULES@ and @LOG_FILTER@).
# Everything it and the agent print goes to the serial console, which the host keeps in a
# file: unlike anything written to the guest's disk, that survives the cut. The host reads
# from it when the agent started, which frames each spool flush made durable (the agent's
# debug line "Spool flushed: these frames are on disk."), and the counters sampled below.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1 </dev/console
mount -t tmpfs tmp /tmp
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "powercut: insmod $m failed"; done
boot=$(sed -n 's/.*powercut\.boot=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /data
# The kernel replays ext4's journal here: the state a real device would boot into.
if ! mount -t ext4 /dev/vda /data; then
  echo "powercut: MOUNT FAILED"
  poweroff -f
fi
echo "powercut: mounted boot=$boot frames=$(ls /data/spool/frames 2>/dev/null | wc -l) damaged=$(ls /data/spool/damaged 2>/dev/null | wc -l)"
mkdir -p /data/log
ip link set lo up

# The agent, restarted like systemd's Restart=always would; more than one start in a boot is a
# crash loop. Its log goes to the console and to the disk.
(
  n=0
  while :; do
    n=$((n + 1))
    echo "powercut: agent start $n"
    FRAMELINK_LOG='@LOG_FILTER@' /bin/framelink-agent run --config /agent.toml
    echo "powercut: agent exited rc=$?"
    sleep 1
  done
) 2>&1 | tee -a "/data/log/agent-$boot.log" &

# What the agent counted, from its /metrics on the guest's loopback, every 0.2 s.
while :; do
  wget -q -O - http://127.0.0.1:9464/metrics 2>/dev/null | awk -v up="$(cut -d' ' -f1 /proc/uptime)" '
    /^framelink_agent_frames_captured_total/ { c += $NF }
    /^framelink_agent_frames_spooled_total/ { s += $NF }
    /^framelink_agent_frames_dropped_total/ { d += $NF }
    /^framelink_agent_spool_records / { r = $NF }
    /^framelink_agent_spool_damaged / { g = $NF }
    END { if (NR) printf "powercut-metrics up=%s captured=%d spooled=%d dropped=%d records=%d damaged=%d\n", up, c, s, d, r, g }'
  sleep 0.2
done &

# Runs until the host cuts the power.
while :; do sleep 3600; done
