#!/bin/sh
# Runs inside systemd-box (a real systemd as PID 1) as root. @ROOT@ and @PYBASE@ are filled in by
# tests/test_systemd.py. Installs the unit as the README says, then proves: notify readiness,
# hardening score, a file classified under the hardening, reload on SIGHUP, a clean stop.
set -u
ROOT=@ROOT@
say() { echo "CHECK $*"; }
state=/var/lib/gender-watcher

systemd-sysusers "$ROOT/systemd/gender-watcher.sysusers"
install -d -o gender-watcher -g gender-watcher "$state" "$state/inbox"
install -d -m 0750 -o gender-watcher -g gender-watcher "$state/done" "$state/failed" "$state/results"
install -d /etc/gender-watcher
sed "s#^checkpoint: .*#checkpoint: $state/model.pt#" "$ROOT/systemd/config.yaml" > /etc/gender-watcher/config.yaml
install -o gender-watcher -g gender-watcher -m 0644 /box/out/first.pt "$state/model.pt"
cp "$ROOT/systemd/gender-watcher.service" /etc/systemd/system/
# Only for this test: the checkout's Python lives under /root (hidden by ProtectHome=) and its
# editable install points at the checkout's own path (which may be under /tmp, hidden by
# PrivateTmp=). A real install (README) has neither, so the unit itself stays as shipped.
mkdir -p /etc/systemd/system/gender-watcher.service.d
printf '[Service]\nBindReadOnlyPaths=@PYBASE@ %s\n' "$ROOT" > /etc/systemd/system/gender-watcher.service.d/test-paths.conf
systemctl daemon-reload

score=$(systemd-analyze security --offline=true /etc/systemd/system/gender-watcher.service 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
say "security_score=$score"

if systemctl start gender-watcher; then say "start=ok"; else say "start=failed"; fi
say "active=$(systemctl is-active gender-watcher)"
say "status_text=$(systemctl show -p StatusText --value gender-watcher)"

cp /box/out/face.jpg "$state/inbox/face.jpg"
for i in $(seq 1 100); do [ -e "$state/done/face.jpg" ] && break; sleep 0.2; done
say "done=$(ls "$state/done" | tr '\n' ' ')"
say "results=$(tr -d '\n ' < "$state/results/process_results.json")"

if systemctl reload gender-watcher; then say "reload=ok"; else say "reload=failed"; fi
for i in $(seq 1 100); do journalctl -u gender-watcher -o cat | grep -q '"reason": "SIGHUP"' && break; sleep 0.2; done
install -o gender-watcher -g gender-watcher -m 0644 /box/out/second.pt "$state/.model.pt.new"
mv "$state/.model.pt.new" "$state/model.pt"
for i in $(seq 1 100); do journalctl -u gender-watcher -o cat | grep -q '"reason": "changed"' && break; sleep 0.2; done
sleep 1
sleep 3  # more watchdog pings
say "watchdog_ts=$(systemctl show -p WatchdogTimestampMonotonic --value gender-watcher)"
systemctl stop gender-watcher
say "after_stop=$(systemctl show -p ActiveState --value gender-watcher) result=$(systemctl show -p Result --value gender-watcher) status=$(systemctl show -p ExecMainStatus --value gender-watcher)"
journalctl -u gender-watcher -o cat > /box/out/journal.txt
journalctl -u gender-watcher -o cat | sed 's/^/JOURNAL /'
