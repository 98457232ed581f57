#!/usr/bin/env bash
# Keep a training command running across crashes: training resumes from its newest complete
# checkpoint on every restart.
#
# Restarts only on crashes: the command died of a signal (e.g. the OOM killer's SIGKILL) or exited
# with a status other than 0 and 2.
#   0  done (max_iter reached, or stopped by `quit`, SIGTERM or SIGINT after a save): stop.
#   2  a problem that would recur on every restart (config typo, bad data, an unusable checkpoint
#      folder, a folder locked by another run): stop and pass the status on; the log says what to fix.
# SIGTERM/SIGINT sent to this script are passed to the command (which saves and exits 0), and the
# script stops without restarting. Ctrl-C in a terminal reaches both anyway.
#   scripts/run.sh python -m vall_e.train yaml=config/LibriTTS/ar.yml
#   MAX_RESTARTS=5 RESTART_DELAY=30 scripts/run.sh torchrun --nproc_per_node 8 -m vall_e.train yaml=...
set -u
if [ $# -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
max=${MAX_RESTARTS:-1000}
delay=${RESTART_DELAY:-10}
child=""
stopping=0
# Forward the signal and keep waiting for the command to save and exit; never restart after it.
forward() {
  stopping=1
  if [ -n "$child" ]; then
    kill -s "$1" "$child" 2>/dev/null
  fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; ; i++)); do
  "$@" &
  child=$!
  # `wait` returns early when a trapped signal arrives: wait again until the command has really ended.
  while :; do
    wait "$child"
    status=$?
    if ! kill -0 "$child" 2>/dev/null; then
      break
    fi
  done
  child=""
  if [ "$stopping" -eq 1 ]; then
    echo "$(date -Is) stopped by a signal; the command exited with status $status" >&2
    exit "$status"
  fi
  if [ $status -eq 0 ]; then
    exit 0
  fi
  if [ $status -eq 2 ]; then
    echo "$(date -Is) exited with status 2: an error that a restart would repeat (see the log above); not restarting" >&2
    exit 2
  fi
  if [ "$i" -ge "$max" ]; then
    echo "$(date -Is) exited with status $status; giving up after $max restarts" >&2
    exit $status
  fi
  echo "$(date -Is) exited with status $status (a crash); restart $((i + 1))/$max in ${delay}s" >&2
  sleep "$delay"
done
