"""The car a session charges (SPEC §10), pure: its acceptance curve and one charging step.

A car has a battery of ``battery_kwh``, a state of charge ``soc`` (0–1) and a most it takes,
``max_kw``. It accepts ``max_kw`` up to :data:`TAPER_SOC` (80 %) state of charge, then
linearly less, down to 0 at 100 % (:func:`acceptance_kw`). It counts as full at
:data:`FULL_SOC` (0.99); below 100 % the curve never reaches 0, so "full" is where a session
of a car with nothing else wanted ends.

:func:`charge` advances a car by ``seconds`` at the least of the CP's rate, Central's limit
for the session and the car's acceptance. It integrates the curve exactly rather than in
Euler steps: the power is constant until the acceptance falls to it, then follows the
taper, where the state of charge approaches 100 % exponentially. So a step of 2 s is the
same as two steps of 1 s (up to rounding), whatever the telemetry interval, and the step in
which the wanted energy is reached or the battery becomes full is cut short there: exactly
``kwh_left`` is delivered, or the car stops at exactly :data:`FULL_SOC`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "FULL_SOC",
    "TAPER_SOC",
    "Car",
    "ChargeStep",
    "Done",
    "acceptance_kw",
    "charge",
    "seconds_to",
]

TAPER_SOC = 0.8
"""The state of charge up to which a car takes its ``max_kw``."""
FULL_SOC = 0.99
"""The state of charge at which a car is full and its session ends."""
_SECONDS_PER_HOUR = 3600.0


class Done(StrEnum):
    """Why a charging step ended the session (both make it COMPLETED, SPEC §10)."""

    WANTED = "WANTED"
    """The energy the driver wanted has been delivered."""
    FULL = "FULL"
    """The battery reached :data:`FULL_SOC`."""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")


@dataclass(frozen=True, slots=True)
class Car:
    """A car's battery: its capacity (kWh), state of charge (0–1) and the most it takes (kW)."""

    battery_kwh: float
    soc: float
    max_kw: float

    def __post_init__(self) -> None:
        for name in ("battery_kwh", "soc", "max_kw"):
            _finite(name, getattr(self, name))
        if self.battery_kwh <= 0:
            raise ValueError(f"battery_kwh must be > 0, not {self.battery_kwh}")
        if not 0.0 <= self.soc <= 1.0:
            raise ValueError(f"soc must be within 0..1, not {self.soc}")
        if self.max_kw <= 0:
            raise ValueError(f"max_kw must be > 0, not {self.max_kw}")

    @property
    def acceptance_kw(self) -> float:
        """The most the car takes now (0 once full: a full car's session has ended)."""
        return 0.0 if self.full else acceptance_kw(self.soc, self.max_kw)

    @property
    def full(self) -> bool:
        return self.soc >= FULL_SOC

    @property
    def room_kwh(self) -> float:
        """The energy that fits before the car is full (0 once full)."""
        return max(0.0, (FULL_SOC - self.soc) * self.battery_kwh)


def acceptance_kw(soc: float, max_kw: float) -> float:
    """What a car of ``max_kw`` accepts at state of charge ``soc`` (0–1): flat, then linear."""
    if soc <= TAPER_SOC:
        return max_kw
    if soc >= 1.0:
        return 0.0
    return max_kw * (1.0 - soc) / (1.0 - TAPER_SOC)


@dataclass(frozen=True, slots=True)
class ChargeStep:
    """The outcome of :func:`charge`."""

    car: Car
    """The car afterwards."""
    kwh: float
    """The energy delivered in the step."""
    seconds: float
    """How long the car charged: the step's length, or less when ``done`` cut it short."""
    kw: float
    """The power drawn at the step's end (0 when ``done``): what telemetry reports."""
    done: Done | None
    """Why the session ends, or None if it goes on."""


def _offered(cp_kw: float, limit_kw: float | None) -> float:
    _finite("cp_kw", cp_kw)
    if cp_kw < 0:
        raise ValueError(f"cp_kw must be >= 0, not {cp_kw}")
    if limit_kw is None:
        return cp_kw
    _finite("limit_kw", limit_kw)
    if limit_kw < 0:
        raise ValueError(f"limit_kw must be >= 0, not {limit_kw}")
    return min(cp_kw, limit_kw)


class _Curve:
    """The charging of one car at a constant offer: state of charge against time (hours).

    At rate ``flat = min(offer, max_kw)`` until the acceptance falls to it, at ``soc_x``; then
    ``d soc/dt = k (1 - soc)`` with ``k = max_kw / ((1 - TAPER_SOC) battery_kwh)``.
    """

    __slots__ = ("battery", "flat", "k", "soc_x")

    def __init__(self, car: Car, offer_kw: float) -> None:
        self.battery = car.battery_kwh
        self.flat = min(offer_kw, car.max_kw)
        self.soc_x = 1.0 - (1.0 - TAPER_SOC) * self.flat / car.max_kw
        self.k = car.max_kw / ((1.0 - TAPER_SOC) * car.battery_kwh)

    def hours(self, start: float, end: float) -> float:
        """How long from ``start`` to ``end`` (``start <= end < 1``); inf if never."""
        if end <= start:
            return 0.0
        if self.flat <= 0.0:
            return math.inf
        hours = 0.0
        if start < self.soc_x:
            flat_end = min(end, self.soc_x)
            hours += (flat_end - start) * self.battery / self.flat
            start = flat_end
        if end > start:
            hours += math.log((1.0 - start) / (1.0 - end)) / self.k
        return hours

    def soc_after(self, start: float, hours: float) -> float:
        """The state of charge ``hours`` after ``start``."""
        if self.flat <= 0.0 or hours <= 0.0:
            return start
        if start < self.soc_x:
            to_x = (self.soc_x - start) * self.battery / self.flat
            if hours <= to_x:
                return start + self.flat * hours / self.battery
            hours -= to_x
            start = self.soc_x
        return 1.0 - (1.0 - start) * math.exp(-self.k * hours)


def seconds_to(car: Car, soc: float, *, cp_kw: float, limit_kw: float | None = None) -> float:
    """How many seconds ``car`` takes to reach ``soc`` (< 1) at this offer; inf if never."""
    if not 0.0 <= soc < 1.0:
        raise ValueError(f"soc must be within 0..1 (excluded), not {soc}")
    curve = _Curve(car, _offered(cp_kw, limit_kw))
    return curve.hours(car.soc, soc) * _SECONDS_PER_HOUR


def charge(
    car: Car,
    seconds: float,
    *,
    cp_kw: float,
    limit_kw: float | None = None,
    kwh_left: float | None = None,
) -> ChargeStep:
    """Charge ``car`` for ``seconds`` at min(``cp_kw``, ``limit_kw``, its acceptance).

    ``limit_kw`` is Central's limit for the session (None: none); ``kwh_left`` is the
    energy the driver still wants (None: until full). The step is cut short where exactly
    ``kwh_left`` has been delivered (:attr:`Done.WANTED`, checked first) or the car reaches
    :data:`FULL_SOC` (:attr:`Done.FULL`).
    """
    _finite("seconds", seconds)
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, not {seconds}")
    offer = _offered(cp_kw, limit_kw)
    if kwh_left is not None:
        _finite("kwh_left", kwh_left)
        if kwh_left < 0:
            raise ValueError(f"kwh_left must be >= 0, not {kwh_left}")
        if kwh_left == 0:
            return ChargeStep(car, 0.0, 0.0, 0.0, Done.WANTED)
    if car.full:
        return ChargeStep(car, 0.0, 0.0, 0.0, Done.FULL)

    curve = _Curve(car, offer)
    hours = seconds / _SECONDS_PER_HOUR
    target = FULL_SOC
    done: Done
    if kwh_left is not None and car.soc + kwh_left / car.battery_kwh <= FULL_SOC:
        target = car.soc + kwh_left / car.battery_kwh
        done = Done.WANTED
    else:
        done = Done.FULL
    to_target = curve.hours(car.soc, target)
    if to_target <= hours:
        if done is Done.WANTED:
            assert kwh_left is not None
            kwh = kwh_left
        else:
            kwh = (FULL_SOC - car.soc) * car.battery_kwh
        after = Car(car.battery_kwh, target, car.max_kw)
        return ChargeStep(after, kwh, to_target * _SECONDS_PER_HOUR, 0.0, done)

    soc = min(curve.soc_after(car.soc, hours), target)
    after = Car(car.battery_kwh, soc, car.max_kw)
    kwh = (soc - car.soc) * car.battery_kwh
    if kwh_left is not None:
        kwh = min(kwh, kwh_left)
    return ChargeStep(after, kwh, seconds, min(offer, after.acceptance_kw), None)
