#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker VM runs the same command and
# jax.distributed finds the others (--distributed).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE
#       copies this checkout to every worker, installs it, fetches the
#       Debian corpus to /tmp/debian_music on each worker.
#   launch/tpu_pod.sh train TPU_NAME ZONE gs://BUCKET/runs/prod [flags...]
#       starts (or resumes) training in the background of every worker
#       (output in ~/train.log); WORKDIR must be on GCS. Without a
#       --gin_file: experiments/production_debian.gin + hardware/tpu_pod.gin.
#   launch/tpu_pod.sh stop TPU_NAME ZONE
#       sends SIGTERM: the run saves a checkpoint and exits.
set -euo pipefail
usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
on_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
    --command="$1"
}
case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all --recurse \
      "$here" "$tpu":spectrostream_jax
    on_all "cd ~/spectrostream_jax && pip install -q -e . 'jax[tpu]' \
      && spectrostream-data fetch-debian-music /tmp/debian_music"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    workdir=$1
    shift
    if [[ " $* " != *" --gin_file="* ]]; then
      set -- --gin_file=experiments/production_debian.gin \
        --gin_file=hardware/tpu_pod.gin "$@"
    fi
    flags=$(printf ' %q' "$@")
    cache=$(dirname "$workdir")/.xla_cache
    on_all "cd ~/spectrostream_jax && export \
      JAX_COMPILATION_CACHE_DIR=$cache && nohup \
      spectrostream-train --distributed --workdir=$workdir$flags \
      > ~/train.log 2>&1 & echo \$! > ~/train.pid"
    ;;
  stop)
    on_all 'kill -TERM "$(cat ~/train.pid)"'
    ;;
  *) usage ;;
esac
