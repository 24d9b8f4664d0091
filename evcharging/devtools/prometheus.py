"""A local Prometheus that scrapes the services of one run (``make run ARGS=--prometheus``).

    python -m evcharging.devtools.prometheus --target central=127.0.0.1:8000 \\
        --target cp-engine=127.0.0.1:8001 --port 9090

writes ``prometheus.yml`` into ``--dir`` (``.cache/prometheus/<port>`` by default, so two
runs on two ports keep apart; the config is JSON, which is YAML), empties the data folder
beside it, prints the URL and then *becomes*
Prometheus (``exec``): a launcher that started it as a child stops it with SIGTERM like
any other child, and sees its log lines. The alert rules of the Docker setup
(``docker/prometheus/rules.yml``) are loaded too when they are there.

The binary is Debian's ``prometheus`` package (``scripts/ensure_prometheus.sh`` installs
it), ``$EVCHARGING_PROMETHEUS``, or any ``prometheus`` on PATH. Its own web UI (Debian
ships the classic one) answers at ``/``: ``/classic/graph`` for graphs, ``/targets``,
``/alerts``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from evcharging.devtools.process import port_free

__all__ = [
    "DEFAULT_PORT",
    "RULES_FILE",
    "PrometheusNotFound",
    "Target",
    "build_parser",
    "command",
    "find_prometheus",
    "graph_url",
    "scrape_config",
    "write_config",
]

DEFAULT_PORT = 9090
DEFAULT_DIR = Path(".cache/prometheus")
DEFAULT_INTERVAL = 2.0
"""Seconds between scrapes of a local run (Docker's setup scrapes every 5 s)."""
ENV_BINARY = "EVCHARGING_PROMETHEUS"
RULES_FILE = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "rules.yml"
"""The alert rules of the Docker setup, in a checkout of the repository."""
INSTALL_HINT = "run scripts/ensure_prometheus.sh (Debian: apt-get install prometheus)"
EXIT_USAGE = 2


class PrometheusNotFound(RuntimeError):
    """No Prometheus binary: say how to get one."""


@dataclass(frozen=True)
class Target:
    """One service to scrape: its job (what it is) and ``host:port`` of its ``/metrics``."""

    job: str
    address: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """``job=host:port``."""
        job, sep, address = text.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not job or not colon or not host or not port.isdigit():
            raise ValueError(f"expected JOB=HOST:PORT, got {text!r}")
        return cls(job, address)


def scrape_config(
    targets: Sequence[Target],
    *,
    interval: float = DEFAULT_INTERVAL,
    rule_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """A Prometheus configuration scraping `targets` (one job per distinct job name, in
    the order first given) every `interval` seconds."""
    jobs: dict[str, list[str]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target.address)
    every = f"{interval:g}s"
    config: dict[str, Any] = {
        "global": {"scrape_interval": every, "evaluation_interval": every,
                   "scrape_timeout": f"{min(interval, 10.0):g}s"},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics",
             "static_configs": [{"targets": addresses}]}
            for job, addresses in jobs.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(path) for path in rule_files]
    return config


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write `config` as JSON (a subset of YAML) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def find_prometheus(environ: Mapping[str, str] = os.environ) -> str:
    """The Prometheus binary: ``$EVCHARGING_PROMETHEUS``, else ``prometheus`` on PATH."""
    wanted = environ.get(ENV_BINARY) or "prometheus"
    found = shutil.which(wanted)
    if found is None:
        where = f"${ENV_BINARY}={wanted}" if environ.get(ENV_BINARY) else "PATH"
        raise PrometheusNotFound(f"no Prometheus binary ({where}); {INSTALL_HINT}")
    return found


def command(binary: str, config: Path, data: Path, port: int, host: str = "127.0.0.1",
            *, log_level: str = "warn") -> list[str]:
    """The command line of a Prometheus with this config, data folder and address."""
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address={host}:{port}",
        f"--log.level={log_level}",
    ]


def graph_url(base: str, expr: str, range_: str = "15m") -> str:
    """The classic UI's graph of `expr` (Debian's Prometheus ships the classic UI)."""
    query = urlencode({"g0.expr": expr, "g0.tab": "0", "g0.range_input": range_})
    return f"{base.rstrip('/')}/classic/graph?{query}"


# --------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m evcharging.devtools.prometheus``."""
    parser = argparse.ArgumentParser(
        prog="python -m evcharging.devtools.prometheus",
        description="Write a Prometheus config scraping the given services, then run "
        "Prometheus on it (this process becomes Prometheus: SIGTERM stops it).",
    )
    parser.add_argument("--target", action="append", default=[], metavar="JOB=HOST:PORT",
                        type=Target.parse, help="a service's /metrics (repeat for each)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port of Prometheus's web UI and API (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="its address (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                        help="seconds between scrapes (default: %(default)g)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder of the config and the data; the data is emptied at "
                        f"start (default: {DEFAULT_DIR}/PORT)")
    parser.add_argument("--rules", type=Path, action="append", default=None,
                        help=f"alert rules file (default: {RULES_FILE.name} of docker/"
                        "prometheus when it is there)")
    parser.add_argument("--log-level", default="warn",
                        choices=("debug", "info", "warn", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        binary = find_prometheus()
    except PrometheusNotFound as exc:
        sys.stderr.write(f"prometheus: {exc}\n")
        return EXIT_USAGE
    if not port_free(args.port, args.host):
        sys.stderr.write(f"prometheus: port {args.port} is already in use; choose another\n")
        return EXIT_USAGE
    rules = args.rules if args.rules is not None else [p for p in [RULES_FILE] if p.is_file()]
    folder = (args.dir or DEFAULT_DIR / str(args.port)).resolve()
    config = write_config(folder / "prometheus.yml",
                          scrape_config(args.target, interval=args.interval, rule_files=rules))
    data = folder / "data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh run: no series of an earlier one
    data.mkdir(parents=True)
    url = f"http://{'localhost' if args.host in ('127.0.0.1', '0.0.0.0') else args.host}"
    sys.stdout.write(
        f"Prometheus on {url}:{args.port}/ scraping {len(args.target)} target(s) every "
        f"{args.interval:g} s (config {config})\n"
    )
    sys.stdout.flush()
    argv_ = command(binary, config, data, args.port, args.host, log_level=args.log_level)
    os.execv(binary, argv_)  # noqa: S606 - becoming Prometheus is the point


if __name__ == "__main__":
    sys.exit(main())
