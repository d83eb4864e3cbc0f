#!/usr/bin/env bash
# Make sure an nginx binary is on this machine: the deployment example's test
# (tests/integration/test_deploy_nginx.py) puts nginx in front of two masters.
set -euo pipefail
if [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "nginx is missing: install the 'nginx' package (apt-get install nginx)" >&2
  exit 1
fi
echo "installing nginx from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: only the binary and its modules, no extras.
apt-get install -y -qq --no-install-recommends nginx >/dev/null
