#!/bin/bash
# Runs INSIDE the systemd VM (tests/vm/systemd-boot): checks the framelink units under a real
# systemd and prints `VMCHECK OK|FAIL <what>` lines on the console, then powers off.
set -u
ok() { echo "VMCHECK OK $*"; }
fail() { echo "VMCHECK FAIL $*"; }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
prop() { systemctl show -p "$2" --value "$1"; }
wait_for() { local n=$1; shift; for _ in $(seq 1 "$n"); do "$@" && return 0; sleep 1; done; return 1; }
http_get() { # port path -> body
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

export -f http_get
echo "VMCHECK START systemd $(systemctl --version | head -1)"
check "agent reaches active (Type=notify READY)" wait_for 180 systemctl is-active --quiet framelink-agent
check "agent unit type is notify with a 30 s watchdog" test "$(prop framelink-agent Type)/$(prop framelink-agent WatchdogUSec)" = "notify/30s"
pid=$(prop framelink-agent MainPID)
check "agent runs as user framelink" test "$(ps -o user= -p "$pid" | tr -d ' ')" = framelink
video=$(getent group video | cut -d: -f3)
check "agent has the video group" grep -qE "^Groups:.*\b$video\b" "/proc/$pid/status"
check "agent: no new privileges" grep -q "^NoNewPrivs:[[:space:]]*1" "/proc/$pid/status"
check "agent: seccomp filter on" grep -q "^Seccomp:[[:space:]]*2" "/proc/$pid/status"
check "agent: no effective capabilities" grep -q "^CapEff:[[:space:]]*0000000000000000" "/proc/$pid/status"
check "agent: / is read-only for it (ProtectSystem=strict)" nsenter -t "$pid" -m sh -c '! touch /usr/framelink-probe 2>/dev/null'
check "agent /healthz answers" bash -c 'http_get 9464 /healthz | grep -q "\"status\""'
check "agent spools frames while no broker answers" wait_for 120 bash -c 'ls /var/lib/framelink/spool/frames 2>/dev/null | grep -q .'
restarts=$(prop framelink-agent NRestarts)
kill -STOP "$pid"   # a hung agent: alive, but its forwarder loop no longer turns
check "watchdog restarts a hung agent" wait_for 90 bash -c "[ \"\$(systemctl show -p NRestarts --value framelink-agent)\" -gt $restarts ] && systemctl is-active --quiet framelink-agent"
check "the journal says why" bash -c "journalctl -u framelink-agent --no-pager | grep -qi 'watchdog timeout'"
check "the restarted agent has a new pid" test "$(prop framelink-agent MainPID)" != "$pid"

check "worker@a reaches active (READY after subscribing)" wait_for 120 systemctl is-active --quiet framelink-worker@a
check "worker@a gets worker id <host>-a" grep -q "FRAMELINK__WORKER__ID=$(hostname)-a" "/proc/$(prop framelink-worker@a MainPID)/environ"
check "worker@a /healthz answers" bash -c 'http_get 9465 /healthz | grep -q "\"group\""'
systemctl start framelink-worker@bad 2>/dev/null
check "worker@bad with a misspelt key does not start" bash -c '! systemctl is-active --quiet framelink-worker@bad'
check "its journal names the key" wait_for 30 bash -c "journalctl -u framelink-worker@bad --no-pager | grep -q 'worker.pipline'"
systemctl stop framelink-worker@bad 2>/dev/null
check "SIGTERM stops the agent cleanly" bash -c 'systemctl stop framelink-agent && journalctl -u framelink-agent --no-pager | grep -q "Agent stopped."'
echo "VMCHECK DONE"
systemctl poweroff
