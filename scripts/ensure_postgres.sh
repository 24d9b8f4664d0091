#!/usr/bin/env sh
# Make sure PostgreSQL's server binaries are available: `python -m evcharging.devtools.postgres`
# runs a local PostgreSQL for Central (SPEC §9: CENTRAL_DB_URL=postgresql://...), and the
# tests that use the `postgres_url` fixture (tests/conftest.py) start one themselves.
#
#   scripts/ensure_postgres.sh
#
# Already there ($EVCHARGING_POSTGRES_BIN, else the newest /usr/lib/postgresql/<version>/bin,
# with initdb and postgres in it): print the version and exit 0, without touching the
# network. Otherwise, as root on a system with apt-get (Debian, the project's Docker images),
# install Debian's `postgresql` package (PostgreSQL 15 on bookworm; it also creates the system
# user `postgres` that the devtool runs the server as when it is run as root; the package's
# own cluster on port 5432 is not used: the devtool's listens on 55432); otherwise explain how
# to install it and exit 1. Safe to re-run.
set -eu

find_bin() {
    if [ -n "${EVCHARGING_POSTGRES_BIN:-}" ]; then
        [ -x "$EVCHARGING_POSTGRES_BIN/initdb" ] && [ -x "$EVCHARGING_POSTGRES_BIN/postgres" ] \
            || return 1
        echo "$EVCHARGING_POSTGRES_BIN"
        return 0
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

# Print "<dir>: <version>", or fail when postgres does not run.
show_version() {
    if out=$("$1/postgres" --version 2>&1) && [ -n "$out" ]; then
        echo "postgresql: $1 ($out)"
    else
        echo "postgresql: $1/postgres is there but '$1/postgres --version' failed:" >&2
        "$1/postgres" --version >&2 || true
        return 1
    fi
}

if bin=$(find_bin); then
    show_version "$bin"
    exit 0
fi

if [ -n "${EVCHARGING_POSTGRES_BIN:-}" ]; then
    echo "postgresql: \$EVCHARGING_POSTGRES_BIN=$EVCHARGING_POSTGRES_BIN has no executable" >&2
    echo "            initdb and postgres. Point it at PostgreSQL's bin folder, or unset it" >&2
    echo "            to use Debian's." >&2
    exit 1
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "postgresql: not found; installing Debian's postgresql package:"
    echo "  apt-get update -qq"
    apt-get update -qq
    echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
        >/dev/null
    if bin=$(find_bin); then
        show_version "$bin"
        exit 0
    fi
    echo "postgresql: apt-get finished but no /usr/lib/postgresql/<version>/bin has initdb" >&2
    echo "            and postgres." >&2
    exit 1
fi

cat >&2 <<'MSG'
postgresql: not found, and this script can install it only as root with apt-get.
Central on PostgreSQL (SPEC §9) and the tests that use it need PostgreSQL's server binaries
(initdb, postgres; 15 or newer): the tests fail without them. Install them, then run this
script again:
  Debian/Ubuntu:  sudo apt-get install postgresql
  Fedora:         sudo dnf install postgresql-server
  macOS:          brew install postgresql@15
or point EVCHARGING_POSTGRES_BIN at the folder that has initdb and postgres.
MSG
exit 1
