#!/usr/bin/env bash
# Runs N clipjax processes on this machine, each with its own simulated CPU
# devices, joined into one global mesh with gloo collectives.
#
#   launch/local.sh N [--devices_per_process=D] [--port=P] [--cmd=train|eval] -- --config=... --workdir=... [...]
#
# Every process gets the same flags plus --coordinator/--num_processes/--process_id.
# Logs go to process_<i>.log in a fresh private directory (mktemp -d, named on
# stderr); process 0's output is streamed. If any process fails, the others are
# killed and the launch exits non-zero. Ctrl-C or SIGTERM to the launcher: every
# process saves the same step and stops.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
N="$1"; shift
DEVICES=4
PORT=$((20000 + RANDOM % 20000))
CMD=train
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --cmd=*) CMD="${1#*=}" ;;
    *) echo "unknown launcher flag $1 (put program flags after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift

HERE="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${CLIPJAX_BIN:-$HERE/.venv/bin}"
# A fresh, private directory: a predictable /tmp name could be a planted symlink.
LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/clipjax-local-$PORT.XXXXXX")"
echo "clipjax local launch: logs in $LOGDIR" >&2

pids=()
signal_=TERM  # Ctrl-C or a SIGTERM to the launcher: the processes save a checkpoint and stop
cleanup() { for p in "${pids[@]}"; do kill -"$signal_" "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    "$BIN/clipjax-$CMD" --coordinator="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
# Gloo prints a "[Gloo] Rank i is connected to ..." line per peer: kept in the logs, streamed
# only with CLIPJAX_VERBOSE=1.
if [[ "${CLIPJAX_VERBOSE:-0}" == 1 ]]; then quiet='^$.'; else quiet='^\[Gloo\] Rank '; fi
tail -n +1 -F "$LOGDIR/process_0.log" 2>/dev/null > >(grep --line-buffered -v -e "$quiet") &
tailpid=$!

# Poll all processes; the first failure kills the rest (a dead peer must not leave others hanging).
status=0
declare -A done_=()
failed=()
reap() {  # records the status of every process that has exited since the last call
  for ((i = 0; i < N; i++)); do
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    if wait "${pids[$i]}"; then rc=0; else rc=$?; fi
    done_[$i]=$rc
    (( rc != 0 )) && failed+=("$i")
  done
  return 0
}
while (( ${#done_[@]} < N && ${#failed[@]} == 0 )); do
  sleep 0.5
  reap
done
if (( ${#failed[@]} > 0 )); then
  # A peer's death makes the others' collectives fail a moment later: let those exit too, then
  # name first the process whose log was written to last the earliest (it went down first).
  sleep 1
  reap
  mapfile -t failed < <(for i in "${failed[@]}"; do
    echo "$(stat -c %.9Y "$LOGDIR/process_$i.log" 2>/dev/null || echo 0) $i"; done | sort -n | cut -d' ' -f2)
  first="${failed[0]}"
  status="${done_[$first]}"
  signal_=KILL  # with a peer gone the collectives cannot finish: a save would only hang
  echo "clipjax local launch: process $first exited with status $status; stopping the others (logs in $LOGDIR)" >&2
  tail -n 20 "$LOGDIR/process_$first.log" >&2 || true
  for i in "${failed[@]:1}"; do
    echo "clipjax local launch: then process $i exited with status ${done_[$i]} (its log: $LOGDIR/process_$i.log)" >&2
  done
fi
kill "$tailpid" 2>/dev/null || true
exit "$status"
