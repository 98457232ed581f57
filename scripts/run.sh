#!/usr/bin/env bash
# Keep a command running: restart it after a crash until it exits 0 (training resumes from the
# latest checkpoint on every restart). Stop with Ctrl-C twice or `quit` typed into training.
#   scripts/run.sh python -m vall_e.train yaml=config/LibriTTS/ar.yml
#   MAX_RESTARTS=5 RESTART_DELAY=30 scripts/run.sh torchrun --nproc_per_node 8 -m vall_e.train yaml=...
set -u
if [ $# -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
max=${MAX_RESTARTS:-1000}
delay=${RESTART_DELAY:-10}
trap 'echo "interrupted"; exit 130' INT TERM
for ((i = 0; ; i++)); do
  "$@"
  status=$?
  if [ $status -eq 0 ]; then
    exit 0
  fi
  if [ "$i" -ge "$max" ]; then
    echo "$(date -Is) exited with status $status; giving up after $max restarts" >&2
    exit $status
  fi
  echo "$(date -Is) exited with status $status; restart $((i + 1))/$max in ${delay}s" >&2
  sleep "$delay"
done
