"""Drivers at a workplace charging site, drawn from a seeded generator (SPEC §10).

Shaped after the workplace sessions of ACN-Data (Lee, Li and Low, "ACN-Data: Analysis and
Applications of an Open EV Charging Dataset", e-Energy 2019; the JPL and Caltech sites), by
hand from its published description, not fitted to the data (the data needs an API token):
most drivers are employees who arrive in a morning peak and stay a working day; a minority
come for a few hours around midday and in the afternoon; a session takes around 10 kWh.

:func:`draw_visit` draws one driver of a :class:`Profile`: employee or visitor, arrival and
stay (hours), the energy wanted (never more than fits in the battery) and the car. The same
generator state gives the same visit. :data:`ACN_WORKPLACE` is the energy benchmark's day
(``benchmarks/energy_bench.py``); the driver load generator (``ev_load --cars``) draws from
a variant of it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

from evcharging.common.car import Car

__all__ = ["ACN_WORKPLACE", "LogNormal", "Normal", "Options", "Profile", "Uniform", "Visit",
           "draw_visit", "weighted"]


class Normal(NamedTuple):
    """A normal distribution clipped to [low, high]."""

    mean: float
    sd: float
    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return min(self.high, max(self.low, rng.gauss(self.mean, self.sd)))


class LogNormal(NamedTuple):
    """A log-normal distribution (its median, the sigma of its log) clipped to [low, high]."""

    median: float
    sigma: float
    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return min(self.high, max(self.low, self.median * math.exp(rng.gauss(0.0, self.sigma))))


class Uniform(NamedTuple):
    """A uniform distribution over [low, high]."""

    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


Options = tuple[tuple[float, float], ...]
"""Values with their weights: ``((40.0, 0.25), (60.0, 0.35), …)``."""


def weighted(rng: random.Random, options: Options) -> float:
    """One of the values, drawn by weight."""
    return rng.choices([o[0] for o in options], weights=[o[1] for o in options])[0]


@dataclass(frozen=True)
class Profile:
    """Who comes to a site: the share of employees, and for each kind its arrival (hour of
    the day), stay (hours) and energy wanted (kWh); the cars' batteries, most kW and state
    of charge at arrival."""

    employee_share: float
    employee_arrival_h: Normal
    employee_stay_h: Normal
    employee_kwh: LogNormal
    visitor_arrival_h: Uniform
    visitor_stay_h: LogNormal
    visitor_kwh: LogNormal
    batteries_kwh: Options
    car_max_kw: Options
    arrival_soc: Uniform


ACN_WORKPLACE = Profile(
    employee_share=0.65,
    employee_arrival_h=Normal(8.25, 0.9, 5.5, 12.0),
    employee_stay_h=Normal(9.0, 1.4, 4.0, 12.5),
    # Above ACN's typical 10 kWh or so per session, so that a limit of half the chargers'
    # sum binds in the morning peak of the energy benchmark (with less, it never does).
    employee_kwh=LogNormal(13.0, 0.5, 2.0, 50.0),
    visitor_arrival_h=Uniform(9.5, 17.0),
    visitor_stay_h=LogNormal(2.0, 0.5, 0.5, 6.0),
    visitor_kwh=LogNormal(6.0, 0.5, 1.0, 25.0),
    batteries_kwh=((40.0, 0.25), (60.0, 0.35), (77.0, 0.30), (100.0, 0.10)),
    # On-board AC chargers: single phase 32 A, three phase 16 A.
    car_max_kw=((7.4, 0.35), (11.0, 0.65)),
    arrival_soc=Uniform(0.10, 0.70),
)
"""The workplace day of the energy benchmark."""


@dataclass(frozen=True)
class Visit:
    """One driver at the site."""

    kind: str
    """``employee`` or ``visitor``."""
    arrival_h: float
    """Hour of the day the car arrives."""
    stay_h: float
    """Hours it stays."""
    kwh_wanted: float
    """The energy wanted, at most what fits in the battery (:attr:`Car.room_kwh`)."""
    car: Car


def draw_visit(rng: random.Random, profile: Profile = ACN_WORKPLACE) -> Visit:
    """One driver of `profile`, drawn from `rng` (seeded: the same state, the same visit)."""
    if rng.random() < profile.employee_share:
        kind, arrive = "employee", profile.employee_arrival_h.draw(rng)
        stay, kwh = profile.employee_stay_h.draw(rng), profile.employee_kwh.draw(rng)
    else:
        kind, arrive = "visitor", profile.visitor_arrival_h.draw(rng)
        stay, kwh = profile.visitor_stay_h.draw(rng), profile.visitor_kwh.draw(rng)
    car = Car(weighted(rng, profile.batteries_kwh), round(profile.arrival_soc.draw(rng), 3),
              weighted(rng, profile.car_max_kw))
    return Visit(kind, arrive, stay, min(kwh, car.room_kwh), car)
