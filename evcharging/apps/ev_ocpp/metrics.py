"""The OCPP gateway's Prometheus metrics on ``OCPP_HTTP_PORT``'s ``GET /metrics`` (families
in :mod:`evcharging.common.metrics`): chargers connected by protocol, its CPs by state,
messages by action, direction and result, refused handshakes, unknown transactions and
Central's commands; the CALL round trips are a histogram observed as they happen."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from evcharging.apps.ev_ocpp.gateway import Gateway
from evcharging.apps.ev_ocpp.logic import PROTOCOLS
from evcharging.common.metrics import PREFIX, counter, described, gauge
from evcharging.common.states import CPState

__all__ = ["OcppCollector"]


class OcppCollector:
    """The gateway at a glance, read at scrape time."""

    NAMES = tuple(PREFIX + n for n in (
        "ocpp_chargers", "ocpp_cps", "ocpp_messages_total", "ocpp_handshakes_refused_total",
        "ocpp_unknown_transactions_total", "ocpp_commands_total", "ocpp_charger_starts_total",
    ))

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def describe(self) -> list[Metric]:
        return described(self.NAMES)

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        protocols = Counter(link.protocol for link in list(g.links.values()))
        yield gauge(PREFIX + "ocpp_chargers", {(p,): protocols[p] for p in PROTOCOLS})
        states = Counter(conn.state for conn in list(g.connectors.values()))
        yield gauge(PREFIX + "ocpp_cps", {(s.value,): states[s] for s in CPState})
        s = g.stats
        yield counter(PREFIX + "ocpp_messages_total",
                      {key: float(n) for key, n in s.messages.items()})
        yield counter(PREFIX + "ocpp_handshakes_refused_total",
                      {(reason,): float(n) for reason, n in s.handshakes_refused.items()})
        yield counter(PREFIX + "ocpp_unknown_transactions_total", s.unknown_transactions)
        yield counter(PREFIX + "ocpp_commands_total",
                      {key: float(n) for key, n in s.commands.items()})
        yield counter(PREFIX + "ocpp_charger_starts_total",
                      {(verdict,): float(n) for verdict, n in s.verdicts.items()})
