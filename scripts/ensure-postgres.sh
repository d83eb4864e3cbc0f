#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this
# machine: the store's contract tests start a throwaway cluster from them.
set -euo pipefail
if [ -n "${HERDER_TEST_PG_DSN:-}" ]; then exit 0; fi
for d in /usr/lib/postgresql/*/bin; do
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then exit 0; fi
done
if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "PostgreSQL server binaries are missing: install the 'postgresql' package (or set HERDER_TEST_PG_DSN)" >&2
  exit 1
fi
echo "installing PostgreSQL server binaries from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
