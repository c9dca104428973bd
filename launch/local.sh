#!/usr/bin/env bash
# Train on this machine (CPU, one GPU host, or a single TPU VM).
#
#   launch/local.sh WORKDIR [spectrostream-train flags...]
#
# With no gin file given, runs the quickstart (tiny model, embedded data):
#   launch/local.sh /tmp/quickstart
#   launch/local.sh /tmp/prod --gin_file=experiments/production_debian.gin \
#       --gin_file=hardware/gpu8.gin
# Compiled steps are cached in WORKDIR/../.xla_cache, so a restart after a
# crash or preemption does not compile again.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
workdir=$1
shift
cd "$(dirname "$0")/.."
if [[ " $* " != *" --gin_file="* ]]; then
  set -- --gin_file=experiments/quickstart.gin "$@"
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(dirname "$workdir")/.xla_cache}
exec spectrostream-train --workdir="$workdir" "$@"
