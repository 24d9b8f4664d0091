"""Central's limits (SPEC §5, §11): how many CPs it holds, and who may keep guessing tokens.

* :class:`TooManyCPs`: registering a new CP past ``CENTRAL_MAX_CPS`` (409). CPs known only
  from the bus do not count; they have a cap of their own (``CENTRAL_MAX_UNREGISTERED``),
  past which their statuses are counted and ignored, and are forgotten after
  :data:`FORGET_UNREGISTERED_AFTER` of silence (:mod:`~evcharging.apps.ev_central.housekeeping`).
  The counts are the controller's :class:`~evcharging.apps.ev_central.tally.Tally`.
* :class:`Throttled`: the TCP plane's answer to an address that failed authentication 20
  times within 10 s (:class:`evcharging.common.throttle.AuthThrottle`; HTTP answers 429).
"""

from __future__ import annotations

from evcharging.apps.ev_central.errors import CentralError

__all__ = [
    "FORGET_UNREGISTERED_AFTER",
    "MAX_CPS",
    "MAX_UNREGISTERED",
    "Throttled",
    "TooManyCPs",
]

MAX_CPS = 100_000
"""Registered CPs Central holds at most (``CENTRAL_MAX_CPS``)."""
MAX_UNREGISTERED = 1_000
"""CPs known only from the bus Central holds at most (``CENTRAL_MAX_UNREGISTERED``)."""
FORGET_UNREGISTERED_AFTER = 3600.0
"""Seconds of silence after which a CP known only from the bus is forgotten."""


class TooManyCPs(CentralError):
    """Registering a new CP would take Central past ``CENTRAL_MAX_CPS``."""

    code = "too_many_cps"
    http_status = 409


class Throttled(CentralError):
    """The client's address failed authentication too often; it may try again later."""

    code = "too_many_requests"
    http_status = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            f"too many failed authentications from this address: try again in "
            f"{retry_after:.0f}s"
        )
        self.retry_after = retry_after
