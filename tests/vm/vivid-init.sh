#!/bin/sh
# /init of the vivid test VM (tests/vm/vivid-capture fills in @SECONDS@ and @MODULES@).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt
ls /dev/video* > /mnt/devices.txt 2>&1
FRAMELINK_LOG=info,librdkafka=error /bin/framelink-agent run --config /agent.toml > /mnt/agent.log 2>&1 &
pid=$!
sleep @SECONDS@
kill -TERM $pid
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
cp -r /tmp/spool /mnt/spool
sync
echo done > /mnt/done
poweroff -f
