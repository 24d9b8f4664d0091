#!/usr/bin/env sh
# Make sure a Chromium is available for the browser end-to-end tests
# (tests/e2e/test_dashboard_*.py drive it with Playwright, tests/e2e/browser.py).
#
#   scripts/ensure_chromium.sh
#
# Chromium already there ($EVCHARGING_CHROMIUM, else `chromium` or `chromium-browser` on
# PATH): print its version and exit 0, without touching the network. Otherwise, as root
# on a system with apt-get (Debian, the project's Docker images), install Debian's
# `chromium` package; otherwise explain how to install it and exit 1. Safe to re-run.
set -eu

find_chromium() {
    if [ -n "${EVCHARGING_CHROMIUM:-}" ]; then
        command -v "$EVCHARGING_CHROMIUM" 2>/dev/null || return 1
        return 0
    fi
    command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null
}

# Print "<path>: <version>", or fail when the binary does not run.
show_version() {
    if out=$("$1" --version 2>&1 | grep -i 'chrom' | tail -n 1) && [ -n "$out" ]; then
        echo "chromium: $1 ($out)"
    else
        echo "chromium: $1 is there but '$1 --version' failed:" >&2
        "$1" --version >&2 || true
        return 1
    fi
}

if bin=$(find_chromium); then
    show_version "$bin"
    exit 0
fi

if [ -n "${EVCHARGING_CHROMIUM:-}" ]; then
    echo "chromium: \$EVCHARGING_CHROMIUM=$EVCHARGING_CHROMIUM is not an executable." >&2
    echo "          Point it at a Chromium binary, or unset it to use chromium from PATH." >&2
    exit 1
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium: not found; installing Debian's chromium package:"
    echo "  apt-get update -qq"
    apt-get update -qq
    echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null
    if bin=$(find_chromium); then
        show_version "$bin"
        exit 0
    fi
    echo "chromium: apt-get finished but no chromium is on PATH." >&2
    exit 1
fi

cat >&2 <<'MSG'
chromium: not found, and this script can install it only as root with apt-get.
The browser end-to-end tests (tests/e2e/test_dashboard_browser.py) need it: they fail
without it. Install it, then run this script again:
  Debian:         sudo apt-get install chromium
  Ubuntu:         a non-snap Chromium or Google Chrome (the chromium-browser package is a snap)
  Fedora:         sudo dnf install chromium
  macOS:          brew install --cask chromium
or point EVCHARGING_CHROMIUM at any Chromium/Chrome binary.
MSG
exit 1
