#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 for the tests (user postgres,
# trust authentication on loopback), as on the project's machines: start the installed
# cluster if it is stopped, install Debian's package if there is none. Fails loudly: the
# PostgreSQL tests must never be skipped.
set -euo pipefail

ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if command -v pg_isready >/dev/null && ready; then exit 0; fi

if ! command -v pg_lsclusters >/dev/null; then
  echo "Installing PostgreSQL (Debian package) for the tests..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

for cluster in $(pg_lsclusters --no-header | awk '{print $1 "/" $2}'); do
  version=${cluster%/*}; name=${cluster#*/}
  hba=/etc/postgresql/$version/$name/pg_hba.conf
  if [ -f "$hba" ] && ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start 2>/dev/null \
    || pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload 2>/dev/null || true
done

for _ in $(seq 1 30); do ready && exit 0; sleep 1; done
echo "PostgreSQL does not answer on 127.0.0.1:5432; the tests need it." >&2
exit 1
