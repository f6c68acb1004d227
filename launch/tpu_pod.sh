#!/usr/bin/env bash
# Runs clipjax on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=v5p-64 [--project=P]
#                     [--version=RUNTIME] [--create] [--spot] [--branch=REF] -- --config=... --workdir=gs://...
#
#   --name         TPU VM name (created with --create if it does not exist)
#   --zone         e.g. us-east5-a
#   --accelerator  accelerator type, e.g. v4-32, v5litepod-64, v5p-128, v6e-256
#   --project      gcloud project (default: gcloud's configured one)
#   --version      TPU software version (default tpu-ubuntu2204-base)
#   --create       create the slice first if it does not exist
#   --spot         create it as a spot (preemptible) slice
#   --branch       git commit-ish to run (default HEAD)
#
# The committed tree at --branch (`git archive`: uncommitted changes stay behind) is
# copied to every worker (scp --worker=all), installed
# into ~/clipjax/.venv with jax[tpu], and `clipjax-train` is started on all
# workers at once; worker 0's log is streamed. jax.distributed finds the
# coordinator from the TPU metadata, so no coordinator flags are needed. A
# preempted or killed run resumes from WORKDIR's last checkpoint when this
# script is run again with the same flags.
set -euo pipefail

NAME= ZONE= ACCEL= PROJECT= VERSION=tpu-ubuntu2204-base CREATE=0 SPOT=0 BRANCH=HEAD
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --create) CREATE=1 ;;
    --spot) SPOT=1 ;;
    --branch=*) BRANCH="${1#*=}" ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (program flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$NAME" || -z "$ZONE" ]]; then echo "--name and --zone are required" >&2; exit 2; fi
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

if ! "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  if (( CREATE )); then
    [[ -z "$ACCEL" ]] && { echo "--accelerator is required with --create" >&2; exit 2; }
    extra=(); (( SPOT )) && extra+=(--spot)
    "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$VERSION" "${extra[@]}"
  else
    echo "TPU $NAME not found in $ZONE (pass --create to create it)" >&2; exit 1
  fi
fi

HERE="$(cd "$(dirname "$0")/.." && pwd)"
LOCAL_TMP="$(mktemp -d)"
trap 'rm -rf "$LOCAL_TMP"' EXIT
git -C "$HERE" archive --format=tar.gz -o "$LOCAL_TMP/clipjax.tar.gz" "$BRANCH"
# The archive lands in a private folder under the worker's home, never at a fixed name in
# the shared /tmp, where another user could have planted a symlink or a different archive.
"${GCLOUD[@]}" ssh "$NAME" --worker=all "${COMMON[@]}" --command='mkdir -p -m 700 ~/.clipjax-upload'
"${GCLOUD[@]}" scp "$LOCAL_TMP/clipjax.tar.gz" "$NAME":.clipjax-upload/clipjax.tar.gz --worker=all "${COMMON[@]}"
"${GCLOUD[@]}" ssh "$NAME" --worker=all "${COMMON[@]}" --command='
  set -e; mkdir -p ~/clipjax && tar -xzf ~/.clipjax-upload/clipjax.tar.gz -C ~/clipjax && rm -f ~/.clipjax-upload/clipjax.tar.gz
  cd ~/clipjax
  test -d .venv || python3 -m venv .venv
  .venv/bin/pip install -q -e . "jax[tpu]"'

ARGS="$(printf " %q" "$@")"
# Every worker runs the same command; worker 0 streams to this terminal, the others log to a file.
"${GCLOUD[@]}" ssh "$NAME" --worker=all "${COMMON[@]}" --command="
  cd ~/clipjax
  if [[ \$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) == 0 ]]; then
    CLIPJAX_DISTRIBUTED=auto .venv/bin/clipjax-train $ARGS 2>&1 | tee -a ~/clipjax/train.log
  else
    CLIPJAX_DISTRIBUTED=auto .venv/bin/clipjax-train $ARGS >> ~/clipjax/train.log 2>&1
  fi"
