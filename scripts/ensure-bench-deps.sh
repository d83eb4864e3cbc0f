#!/usr/bin/env bash
# Make sure the benchmarks' baselines are on this machine: distcc/distccd
# (bench/startup.py, bench/build.py) and redis-server (the Celery peer of
# bench/dispatch.py --peers). Idempotent and quiet: does nothing when both are
# present, installs Debian's packages otherwise (as root). The benches start
# their own distccd and redis-server on loopback; no system service is used.
set -euo pipefail
missing=()
command -v distcc >/dev/null 2>&1 && command -v distccd >/dev/null 2>&1 || missing+=(distcc)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "benchmark baselines missing: ${missing[*]}; install them as root:" >&2
  echo "  sudo apt-get install ${missing[*]}   (or run: sudo bash scripts/ensure-bench-deps.sh)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "benchmark baselines missing: ${missing[*]}; no apt-get here, install them by hand" >&2
  exit 1
fi
echo "installing benchmark baselines from Debian's packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
