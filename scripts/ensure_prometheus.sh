#!/usr/bin/env sh
# Make sure Prometheus and promtool are available: `make run ARGS=--prometheus` starts a
# local Prometheus, and the metrics tests (tests/integration/test_prometheus.py,
# tests/unit/test_prometheus_files.py) run a real one and check the rules with promtool.
#
#   scripts/ensure_prometheus.sh
#
# Already there ($EVCHARGING_PROMETHEUS, else `prometheus` on PATH, with `promtool` beside
# it or on PATH): print their versions and exit 0, without touching the network.
# Otherwise, as root on a system with apt-get (Debian, the project's Docker images),
# install Debian's `prometheus` package (it brings promtool; its service is not started:
# the project runs its own); otherwise explain how to install it and exit 1. Safe to re-run.
set -eu

find_prometheus() {
    if [ -n "${EVCHARGING_PROMETHEUS:-}" ]; then
        command -v "$EVCHARGING_PROMETHEUS" 2>/dev/null || return 1
        return 0
    fi
    command -v prometheus 2>/dev/null
}

find_promtool() {
    dir=$(dirname "$1")
    if [ -x "$dir/promtool" ]; then
        echo "$dir/promtool"
    else
        command -v promtool 2>/dev/null
    fi
}

# Print "<path>: <version>" for both, or fail when one does not run.
show_versions() {
    for bin in "$1" "$2"; do
        if out=$("$bin" --version 2>&1 | head -n 1) && [ -n "$out" ]; then
            echo "prometheus: $bin ($out)"
        else
            echo "prometheus: $bin is there but '$bin --version' failed:" >&2
            "$bin" --version >&2 || true
            return 1
        fi
    done
}

if bin=$(find_prometheus) && tool=$(find_promtool "$bin"); then
    show_versions "$bin" "$tool"
    exit 0
fi

if [ -n "${EVCHARGING_PROMETHEUS:-}" ]; then
    echo "prometheus: \$EVCHARGING_PROMETHEUS=$EVCHARGING_PROMETHEUS is not an executable" >&2
    echo "            with a promtool beside it or on PATH. Point it at a Prometheus binary," >&2
    echo "            or unset it to use prometheus from PATH." >&2
    exit 1
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "prometheus: not found; installing Debian's prometheus package:"
    echo "  apt-get update -qq"
    apt-get update -qq
    echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus"
    # policy-rc.d keeps the package's own service from starting where an init system would.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        >/dev/null
    if bin=$(find_prometheus) && tool=$(find_promtool "$bin"); then
        show_versions "$bin" "$tool"
        exit 0
    fi
    echo "prometheus: apt-get finished but prometheus or promtool is not on PATH." >&2
    exit 1
fi

cat >&2 <<'MSG'
prometheus: not found, and this script can install it only as root with apt-get.
`make run ARGS=--prometheus` and the metrics tests need Prometheus and promtool: the tests
fail without them. Install them, then run this script again:
  Debian/Ubuntu:  sudo apt-get install prometheus   (promtool comes with it)
  Fedora:         sudo dnf install golang-github-prometheus
  macOS:          brew install prometheus
  anywhere:       the release archive from the Prometheus project (prometheus + promtool)
or point EVCHARGING_PROMETHEUS at a prometheus binary (promtool beside it or on PATH).
MSG
exit 1
