#!/usr/bin/env sh
# Make sure libfaketime is available: the clock faults of the chaos suite (tests/chaos/,
# `make chaos` and the fast subset in `make test`) step a running service's clock by
# preloading libfaketime (LD_PRELOAD, FAKETIME_TIMESTAMP_FILE).
#
#   scripts/ensure_faketime.sh
#
# Already there ($EVCHARGING_LIBFAKETIME, else Debian's libfaketime.so.1): print its path and
# exit 0, without touching the network. Otherwise, as root on a system with apt-get
# (Debian, the project's Docker images), install Debian's `faketime` package (it brings
# libfaketime); otherwise explain how to install it and exit 1. Safe to re-run.
set -eu

find_lib() {
    if [ -n "${EVCHARGING_LIBFAKETIME:-}" ]; then
        [ -r "$EVCHARGING_LIBFAKETIME" ] || return 1
        echo "$EVCHARGING_LIBFAKETIME"
        return 0
    fi
    for lib in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 \
               /usr/local/lib/faketime/libfaketime.so.1; do
        if [ -r "$lib" ]; then
            echo "$lib"
            return 0
        fi
    done
    return 1
}

if lib=$(find_lib); then
    echo "libfaketime: $lib"
    exit 0
fi

if [ -n "${EVCHARGING_LIBFAKETIME:-}" ]; then
    echo "libfaketime: \$EVCHARGING_LIBFAKETIME=$EVCHARGING_LIBFAKETIME is not a readable file." >&2
    echo "             Point it at libfaketime.so.1, or unset it to use Debian's." >&2
    exit 1
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "libfaketime: not found; installing Debian's faketime package:"
    echo "  apt-get update -qq"
    apt-get update -qq
    echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime \
        >/dev/null
    if lib=$(find_lib); then
        echo "libfaketime: $lib"
        exit 0
    fi
    echo "libfaketime: apt-get finished but libfaketime.so.1 is not where Debian puts it." >&2
    exit 1
fi

cat >&2 <<'MSG'
libfaketime: not found, and this script can install it only as root with apt-get.
The clock faults of the chaos tests need it: they fail without it. Install it, then run
this script again:
  Debian/Ubuntu:  sudo apt-get install faketime   (libfaketime comes with it)
  Fedora:         sudo dnf install libfaketime
  anywhere:       build it from the libfaketime sources (make; make install)
or point EVCHARGING_LIBFAKETIME at a libfaketime.so.1.
MSG
exit 1
