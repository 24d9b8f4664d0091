"""Smart charging (SPEC §10), pure: how a site's power limit is shared among its sessions.

:func:`allocate` takes a site's limit (kW, or None for no limit) and the site's supplying
sessions (:class:`Demand`: what the CP and the car can take, the energy still wanted and the
departure) and gives each session its kW, with one of two :class:`Policy` values:

* ``equal`` (water-filling): every session gets the same share, capped by what it can take;
  what a capped session cannot use is shared again among the others, until the limit is used
  up or every session has all it can take.
* ``least_laxity``: the sessions with the least slack are served first, each as much as it can
  take. Slack = time to departure − energy still wanted ÷ the most the session can take (in
  hours). Sessions with the same slack share as ``equal`` does; sessions without a departure
  come last, sharing what is left as ``equal`` does. A session with a departure but no wanted
  energy owes nothing, so its slack is its time to departure.

Either way:

* the shares add up to no more than the limit (checked with an exactly rounded sum, and
  trimmed if floating-point rounding put them a hair over);
* no share is above what its session can take (``min(cp_kw, car_kw)``);
* no power is kept back: if any session gets less than it can take, the limit is used up;
* the result depends on the sessions, not on their order (ties are broken by session id).

It knows nothing of Central, Kafka or the clock: Central calls it on every session start and
end and every ``CENTRAL_ALLOCATION_INTERVAL``, with ``now`` from its clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["Demand", "Policy", "allocate", "slack_hours"]


class Policy(StrEnum):
    """``CENTRAL_ALLOCATION``."""

    EQUAL = "equal"
    LEAST_LAXITY = "least_laxity"


def _non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


@dataclass(frozen=True, slots=True)
class Demand:
    """One supplying session of a site, as the allocator sees it."""

    session_id: str
    cp_kw: float
    """The most the CP can deliver (its rate)."""
    car_kw: float | None = None
    """The most the car takes now (its acceptance); None without a car."""
    kwh_left: float | None = None
    """The energy still wanted; None if the driver gave none."""
    departure: datetime | None = None
    """When the car leaves (aware, UTC); None if the driver gave none."""

    def __post_init__(self) -> None:
        _non_negative("cp_kw", self.cp_kw)
        if self.car_kw is not None:
            _non_negative("car_kw", self.car_kw)
        if self.kwh_left is not None:
            _non_negative("kwh_left", self.kwh_left)
        if self.departure is not None and self.departure.tzinfo is None:
            raise ValueError("departure must carry a timezone")

    @property
    def cap_kw(self) -> float:
        """The most the session can take: the least of the CP's and the car's."""
        return self.cp_kw if self.car_kw is None else min(self.cp_kw, self.car_kw)


def slack_hours(demand: Demand, now: datetime) -> float:
    """Time to departure − energy still wanted ÷ the most it can take, in hours.

    ``inf`` without a departure (served last); ``-inf`` for a session that wants energy it
    cannot take at all (it is late whatever it gets).
    """
    if demand.departure is None:
        return math.inf
    to_departure = (demand.departure - now).total_seconds() / 3600.0
    wanted = demand.kwh_left or 0.0
    if wanted == 0.0:
        return to_departure
    if demand.cap_kw == 0.0:
        return -math.inf
    return to_departure - wanted / demand.cap_kw


def _water_fill(budget: float, demands: Sequence[Demand], shares: dict[str, float]) -> float:
    """Share ``budget`` equally among ``demands``, each capped; returns what is left."""
    ordered = sorted(demands, key=lambda d: (d.cap_kw, d.session_id))
    for index, demand in enumerate(ordered):
        fair = budget / (len(ordered) - index)
        if demand.cap_kw <= fair:
            shares[demand.session_id] = demand.cap_kw
            budget -= demand.cap_kw
        else:
            for rest in ordered[index:]:
                shares[rest.session_id] = fair
            return 0.0
    return max(0.0, budget)


def _trim(limit_kw: float, shares: dict[str, float]) -> None:
    """Take off the largest share whatever rounding put the sum over the limit (an ulp or so).

    Each round lowers a share by at least one ulp, and all shares at 0 add up to 0.
    """
    while (excess := math.fsum(shares.values()) - limit_kw) > 0:
        largest = max(shares, key=lambda sid: (shares[sid], sid))
        lowered = max(0.0, shares[largest] - excess)
        if lowered == shares[largest]:
            lowered = math.nextafter(lowered, 0.0)
        shares[largest] = lowered


def _groups(demands: Iterable[Demand], now: datetime) -> list[list[Demand]]:
    """The demands grouped by equal slack, least slack first (no departure last)."""
    by_slack: dict[float, list[Demand]] = {}
    for demand in demands:
        by_slack.setdefault(slack_hours(demand, now), []).append(demand)
    return [by_slack[slack] for slack in sorted(by_slack)]


def allocate(
    limit_kw: float | None,
    demands: Sequence[Demand],
    *,
    policy: Policy = Policy.EQUAL,
    now: datetime | None = None,
) -> dict[str, float]:
    """The kW each session may draw under the site's ``limit_kw`` (None: no limit).

    ``now`` (aware) is needed by ``least_laxity`` when a session has a departure.
    Raises ValueError on a negative or non-finite limit, duplicate session ids, or a
    departure without ``now``.
    """
    ids = [d.session_id for d in demands]
    if len(set(ids)) != len(ids):
        raise ValueError("each session may appear only once")
    if limit_kw is None:
        return {d.session_id: d.cap_kw for d in demands}
    _non_negative("limit_kw", limit_kw)
    policy = Policy(policy)
    shares: dict[str, float] = {}
    if policy is Policy.EQUAL:
        _water_fill(limit_kw, demands, shares)
    else:
        if now is None:
            if any(d.departure is not None for d in demands):
                raise ValueError("least_laxity needs now when a session has a departure")
        elif now.tzinfo is None:
            raise ValueError("now must carry a timezone")
        budget = limit_kw
        for group in _groups(demands, now) if now is not None else [list(demands)]:
            budget = _water_fill(budget, group, shares)
    _trim(limit_kw, shares)
    return {sid: shares[sid] for sid in sorted(shares)}
