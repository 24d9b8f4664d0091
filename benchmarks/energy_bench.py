"""Energy benchmark: one limited site for a simulated day, with the pure allocator and car model.

    .venv/bin/python benchmarks/energy_bench.py                 # 16 chargers, seed 17
    .venv/bin/python benchmarks/energy_bench.py --acnportal     # and Caltech's acnportal
    make bench-energy ARGS=--acnportal                          # the same (see below)

No broker, no services: a simulated clock steps through one weekday (``--step`` seconds at a
time, 60 by default) at a workplace site of ``--chargers`` chargers of ``--charger-kw`` each,
under a limit of ``--limit-fraction`` (half) of the chargers' sum. The cars come from a seeded
generator shaped after ACN-Data's workplace sessions (:func:`draw_scenario`). Every step, for
each policy, the site's limit is shared among the supplying sessions by
:func:`evcharging.apps.ev_central.allocation.allocate` (what Central will do every
``CENTRAL_ALLOCATION_INTERVAL``), and each car is charged for the step by
:func:`evcharging.common.car.charge` at min(charger, share, acceptance). A car leaves at its
departure with whatever it has; the measured power of a step is the energy the cars took in it
divided by its length.

Runs, on the very same cars:

* ``equal`` and ``least_laxity`` (SPEC §10) under the limit;
* ``uncontrolled``: no limit (every car at min(charger, acceptance)), for reference;
* with ``--acnportal``: Caltech's ACN-Sim (``pip install -r requirements-bench.txt``) with its
  round robin and least-laxity-first schedulers under the same limit, and its uncontrolled
  charging. Each EV gets ACN-Sim's ``Linear2StageBattery`` (flat to 80 % state of charge, then
  linear to 0 at 100 %: the same curve) with the car's capacity, state of charge and most kW;
  the site is one aggregate current constraint at one voltage. Its schedulers know the
  chargers' limits but not the cars' (unless given an estimator, which these runs do not use).
  If acnportal is missing or fails, the report says why, word for word.

Writes ``<out>/energy-<date>.md`` (the scenario, the table, notes), ``.json`` (the numbers, per
car) and ``.png`` (the site's measured power against its limit over the day) and prints the
table. Takes seconds (acnportal's round robin is the slow part). Not a test: nothing is
asserted here (tests/unit/test_energy_bench.py checks that a quick run adds up).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evcharging.apps.ev_central.allocation import Demand, Policy, allocate
from evcharging.common.car import Car, charge
from evcharging.common.workplace import ACN_WORKPLACE, draw_visit

DEFAULT_OUT = ROOT / "benchmarks" / "results"
DAY = date(2026, 12, 7)
"""The simulated day (a Monday); only its clock matters."""
DAY_SECONDS = 86_400
SHORT = 0.9
"""A car that leaves with less than this share of what it wanted counts as short."""
ACN_VOLTAGE = 230.0
"""The voltage of the acnportal network (its schedulers work in amps)."""

# --- the cars of one day ------------------------------------------------------------------
#
# evcharging.common.workplace draws them: shaped after the workplace sessions of ACN-Data
# (Lee, Li and Low, e-Energy 2019), by hand from its published description (see there).
# The names below are its ACN_WORKPLACE profile, for the report.

EMPLOYEE_SHARE = ACN_WORKPLACE.employee_share
EMPLOYEE_ARRIVAL_H = ACN_WORKPLACE.employee_arrival_h
"""Normal: mean, standard deviation, clipped to [low, high] (hours after midnight)."""
EMPLOYEE_STAY_H = ACN_WORKPLACE.employee_stay_h
VISITOR_ARRIVAL_H = ACN_WORKPLACE.visitor_arrival_h
"""Uniform over [low, high]."""
VISITOR_STAY_H = ACN_WORKPLACE.visitor_stay_h
"""Log-normal: median, sigma of the log, clipped."""
EMPLOYEE_KWH = ACN_WORKPLACE.employee_kwh
VISITOR_KWH = ACN_WORKPLACE.visitor_kwh
BATTERIES_KWH = ACN_WORKPLACE.batteries_kwh
CAR_MAX_KW = ACN_WORKPLACE.car_max_kw
ARRIVAL_SOC = ACN_WORKPLACE.arrival_soc


@dataclass(frozen=True)
class Arrival:
    session_id: str
    station: str
    kind: str
    arrival: int
    """The step the car plugs in at."""
    departure: int
    """The step it leaves at (it charges in steps arrival … departure − 1)."""
    kwh_wanted: float
    car: Car


@dataclass(frozen=True)
class Scenario:
    seed: int
    chargers: int
    charger_kw: float
    limit_kw: float
    step: int
    """Seconds per simulated step."""
    arrivals: tuple[Arrival, ...]
    turned_away: int
    """Cars that found every charger taken (the same for every run)."""

    @property
    def steps(self) -> int:
        return DAY_SECONDS // self.step

    def at(self, step: int) -> datetime:
        return datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC) + timedelta(
            seconds=step * self.step)

    @property
    def kwh_wanted(self) -> float:
        return math.fsum(a.kwh_wanted for a in self.arrivals)


def draw_scenario(*, seed: int, chargers: int, charger_kw: float, limit_fraction: float,
                  step: int, cars: int) -> Scenario:
    """``cars`` drivers of one weekday; each takes the first free charger, or goes away."""
    rng = random.Random(seed)
    drawn: list[tuple[float, float, str, float, Car]] = []
    for _ in range(cars):
        visit = draw_visit(rng, ACN_WORKPLACE)
        drawn.append((visit.arrival_h, min(visit.arrival_h + visit.stay_h, 24.0), visit.kind,
                      visit.kwh_wanted, visit.car))
    drawn.sort(key=lambda d: d[0])
    steps = DAY_SECONDS // step
    free_at = [0] * chargers
    arrivals: list[Arrival] = []
    turned_away = 0
    for arrive_h, leave_h, kind, kwh, car in drawn:
        arrival = int(arrive_h * 3600) // step
        departure = min(steps, max(arrival + 1, int(leave_h * 3600) // step))
        station = next((i for i in range(chargers) if free_at[i] <= arrival), None)
        if station is None:
            turned_away += 1
            continue
        free_at[station] = departure
        arrivals.append(Arrival(f"S{len(arrivals) + 1:03d}", f"CP-{station + 1:02d}", kind,
                                arrival, departure, round(kwh, 3), car))
    return Scenario(seed, chargers, charger_kw, round(chargers * charger_kw * limit_fraction, 3),
                    step, tuple(arrivals), turned_away)


# --- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    limited: bool
    power_kw: list[float] = field(default_factory=list)
    """The measured power of each step (kW)."""
    delivered: dict[str, float] = field(default_factory=dict)
    """kWh each car had when it left."""
    seconds: float = 0.0
    """Real time the run took."""

    def kwh_delivered(self, scenario: Scenario) -> float:
        """The energy delivered towards what the cars wanted (more counts as what they wanted:
        acnportal's uncontrolled charging does not stop at the requested energy)."""
        return math.fsum(min(self.delivered[a.session_id], a.kwh_wanted)
                         for a in scenario.arrivals)

    def short(self, scenario: Scenario) -> int:
        return sum(1 for a in scenario.arrivals
                   if self.delivered[a.session_id] < SHORT * a.kwh_wanted)

    def peak_kw(self) -> float:
        return max(self.power_kw, default=0.0)

    def minutes_above(self, limit_kw: float, step: int) -> float:
        return sum(step for p in self.power_kw if p > limit_kw + 1e-6) / 60

    def summary(self, scenario: Scenario) -> dict[str, Any]:
        return {
            "name": self.name, "limited": self.limited,
            "kwh_wanted": round(scenario.kwh_wanted, 3),
            "kwh_delivered": round(self.kwh_delivered(scenario), 3),
            "cars_short": self.short(scenario), "peak_kw": round(self.peak_kw(), 3),
            "minutes_above_limit": self.minutes_above(scenario.limit_kw, scenario.step),
            "seconds": round(self.seconds, 3),
        }


def simulate(scenario: Scenario, policy: Policy | None) -> Run:
    """The site's day with ``policy`` under its limit, or with no limit (None)."""
    began = time.perf_counter()
    run = Run(policy.value if policy else "uncontrolled", policy is not None)
    by_arrival: dict[int, list[Arrival]] = {}
    for a in scenario.arrivals:
        by_arrival.setdefault(a.arrival, []).append(a)
    plugged: dict[str, Arrival] = {}
    cars: dict[str, Car] = {}
    got: dict[str, float] = {}
    charging: set[str] = set()
    limit = scenario.limit_kw if policy else None
    hours = scenario.step / 3600
    for step in range(scenario.steps):
        for sid in [s for s, a in plugged.items() if a.departure <= step]:
            run.delivered[sid] = got[sid]
            del plugged[sid]
            charging.discard(sid)
        for a in by_arrival.get(step, ()):
            plugged[a.session_id], cars[a.session_id], got[a.session_id] = a, a.car, 0.0
            charging.add(a.session_id)
        now = scenario.at(step)
        demands = [
            Demand(sid, scenario.charger_kw, cars[sid].acceptance_kw,
                   max(0.0, plugged[sid].kwh_wanted - got[sid]),
                   scenario.at(plugged[sid].departure))
            for sid in sorted(charging)
        ]
        shares = allocate(limit, demands, policy=policy or Policy.EQUAL, now=now)
        energy = 0.0
        for sid, share in shares.items():
            done = charge(cars[sid], scenario.step, cp_kw=scenario.charger_kw, limit_kw=share,
                          kwh_left=max(0.0, plugged[sid].kwh_wanted - got[sid]))
            cars[sid], got[sid] = done.car, got[sid] + done.kwh
            energy += done.kwh
            if done.done is not None:
                charging.discard(sid)
        run.power_kw.append(energy / hours)
    for sid in plugged:
        run.delivered[sid] = got[sid]
    run.seconds = time.perf_counter() - began
    return run


ACN_RUNS = ("acnportal round robin", "acnportal least laxity first", "acnportal uncontrolled")


def simulate_acnportal(scenario: Scenario, name: str) -> Run:
    """The same cars in Caltech's ACN-Sim with one of its schedulers (see the docstring)."""
    from acnportal import acnsim, algorithms

    began = time.perf_counter()
    network = acnsim.ChargingNetwork()
    stations = [f"CP-{i + 1:02d}" for i in range(scenario.chargers)]
    for station in stations:
        network.register_evse(
            acnsim.EVSE(station, max_rate=scenario.charger_kw * 1000 / ACN_VOLTAGE),
            ACN_VOLTAGE, 0)
    # ACN-Sim wants at least one constraint: without a limit, the chargers' sum (never binds)
    limited = name != "acnportal uncontrolled"
    site_kw = scenario.limit_kw if limited else scenario.chargers * scenario.charger_kw
    network.add_constraint(acnsim.Current(stations), site_kw * 1000 / ACN_VOLTAGE, name="site")
    events = acnsim.EventQueue()
    evs = []
    for a in scenario.arrivals:
        battery = acnsim.Linear2StageBattery(a.car.battery_kwh, a.car.soc * a.car.battery_kwh,
                                             a.car.max_kw)
        ev = acnsim.EV(a.arrival, a.departure, a.kwh_wanted, a.station, a.session_id, battery)
        evs.append(ev)
        events.add_event(acnsim.PluginEvent(a.arrival, ev))
    if name == "acnportal round robin":
        scheduler = algorithms.RoundRobin(algorithms.first_come_first_served,
                                          continuous_inc=0.5)
    elif name == "acnportal least laxity first":
        scheduler = algorithms.SortedSchedulingAlgo(algorithms.least_laxity_first)
    else:
        scheduler = algorithms.UncontrolledCharging()
    sim = acnsim.Simulator(network, scheduler, events, scenario.at(0),
                           period=scenario.step / 60, verbose=False)
    sim.run()
    power = [float(p) for p in acnsim.analysis.aggregate_power(sim)][: scenario.steps]
    run = Run(name, limited, power + [0.0] * (scenario.steps - len(power)))
    run.delivered = {ev.session_id: float(ev.energy_delivered) for ev in evs}
    run.seconds = time.perf_counter() - began
    return run


def run_acnportal(scenario: Scenario) -> tuple[list[Run], str | None]:
    """acnportal's runs, or none and why (the exception, word for word)."""
    runs: list[Run] = []
    try:
        for name in ACN_RUNS:
            runs.append(simulate_acnportal(scenario, name))
    except Exception as exc:  # noqa: BLE001 (the report says what went wrong, whatever it is)
        return [], f"{type(exc).__name__}: {exc}"
    return runs, None


def run_all(scenario: Scenario, acnportal: bool) -> tuple[list[Run], str | None]:
    runs = [simulate(scenario, Policy.EQUAL), simulate(scenario, Policy.LEAST_LAXITY),
            simulate(scenario, None)]
    if not acnportal:
        return runs, None
    acn_runs, error = run_acnportal(scenario)
    return runs + acn_runs, error


# --- the report ---------------------------------------------------------------------------

HEADER = ("run", "limit kW", "wanted kWh", "delivered kWh", "delivered %",
          f"cars < {SHORT:.0%}", "peak kW", "peak ÷ limit", "min above limit", "real s")


def row(run: Run, scenario: Scenario) -> list[str]:
    wanted = scenario.kwh_wanted
    delivered = run.kwh_delivered(scenario)
    return [
        run.name,
        f"{scenario.limit_kw:g}" if run.limited else "none",
        f"{wanted:.1f}", f"{delivered:.1f}",
        f"{100 * delivered / wanted:.1f}" if wanted else "-",
        f"{run.short(scenario)} of {len(scenario.arrivals)}",
        f"{run.peak_kw():.1f}", f"{run.peak_kw() / scenario.limit_kw:.2f}",
        f"{run.minutes_above(scenario.limit_kw, scenario.step):g}",
        f"{run.seconds:.2f}",
    ]


@dataclass
class Tally:
    """One policy's totals under one limit over several simulated days."""

    kwh_wanted: float = 0.0
    kwh_delivered: float = 0.0
    cars: int = 0
    short: int = 0
    days: int = 0

    def add(self, scenario: Scenario, run: Run) -> None:
        self.kwh_wanted += scenario.kwh_wanted
        self.kwh_delivered += run.kwh_delivered(scenario)
        self.cars += len(scenario.arrivals)
        self.short += run.short(scenario)
        self.days += 1

    def cell(self) -> str:
        share = 100 * self.kwh_delivered / self.kwh_wanted if self.kwh_wanted else 100.0
        return f"{share:.1f} %, {self.short} short"


Sweep = dict[float, dict[str, Tally]]
"""Per limit fraction, per run name."""


def sweep_days(args: argparse.Namespace) -> Sweep:
    """Our runs on ``--days`` days (seeds ``seed`` …) under each limit fraction."""
    sweep: Sweep = {}
    for fraction in [args.limit_fraction, *args.sweep]:
        tallies = sweep.setdefault(fraction, {})
        for seed in range(args.seed, args.seed + args.days):
            scenario = draw_scenario(seed=seed, chargers=args.chargers,
                                     charger_kw=args.charger_kw, limit_fraction=fraction,
                                     step=args.step, cars=args.cars)
            for run in run_all(scenario, acnportal=False)[0]:
                tallies.setdefault(run.name, Tally()).add(scenario, run)
    return sweep


def sweep_table(sweep: Sweep, chargers_kw: float) -> str:
    fractions = list(sweep)
    names = list(sweep[fractions[0]])
    header = ["run", *(f"limit {f:.0%} ({f * chargers_kw:g} kW)" for f in fractions)]
    rows = [[name, *(sweep[f][name].cell() for f in fractions)] for name in names]
    return markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|:---|" + "|".join("---:" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def scenario_lines(s: Scenario) -> list[str]:
    employees = sum(1 for a in s.arrivals if a.kind == "employee")
    return [
        f"- one site of {s.chargers} chargers of {s.charger_kw:g} kW "
        f"({s.chargers * s.charger_kw:g} kW in all) under a limit of {s.limit_kw:g} kW; "
        f"a simulated day in steps of {s.step} s; seed {s.seed}",
        f"- {len(s.arrivals)} cars charged ({employees} employees, "
        f"{len(s.arrivals) - employees} visitors), {s.turned_away} found every charger taken "
        f"and went away; {s.kwh_wanted:.1f} kWh wanted in all",
        "- employees ({:.0%} of drivers): arrival ~ normal(mean {:g} h, sd {:g} h) clipped "
        "to {:g}–{:g} h; stay ~ normal({:g} h, {:g} h) clipped to {:g}–{:g} h; energy "
        "wanted ~ log-normal(median {:g} kWh, σ {:g}) clipped to {:g}–{:g} kWh".format(
            EMPLOYEE_SHARE, *EMPLOYEE_ARRIVAL_H, *EMPLOYEE_STAY_H, *EMPLOYEE_KWH),
        "- visitors: arrival ~ uniform {:g}–{:g} h; stay ~ log-normal(median {:g} h, "
        "σ {:g}) clipped to {:g}–{:g} h; energy wanted ~ log-normal(median {:g} kWh, "
        "σ {:g}) clipped to {:g}–{:g} kWh".format(
            *VISITOR_ARRIVAL_H, *VISITOR_STAY_H, *VISITOR_KWH),
        "- cars: battery " + ", ".join(f"{b:g} kWh ({w:.0%})" for b, w in BATTERIES_KWH)
        + "; on-board charger " + ", ".join(f"{k:g} kW ({w:.0%})" for k, w in CAR_MAX_KW)
        + f"; state of charge at arrival ~ uniform {ARRIVAL_SOC[0]:g}–{ARRIVAL_SOC[1]:g}; "
        "no car wants more than fits below 99 %",
        "- the shapes follow the description of ACN-Data's workplace sessions (Lee, Li and "
        "Low, e-Energy 2019): a morning arrival peak, employees staying a working day, a "
        "minority of shorter visits; they are set by hand, not fitted to the data",
    ]


def report(scenario: Scenario, runs: Sequence[Run], sweep: Sweep,
           acn_error: str | None, acn_asked: bool, command: str, png_name: str,
           started: datetime) -> str:
    lines = [
        f"# Energy benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`{command}`",
        "",
        "## Scenario",
        "",
        *scenario_lines(scenario),
        "",
        "## Results",
        "",
        markdown_table(HEADER, [row(r, scenario) for r in runs]),
        "",
    ]
    if acn_error is not None:
        lines += [f"acnportal could not be run: `{acn_error}`", ""]
    elif acn_asked:
        from importlib.metadata import version

        lines += [f"acnportal {version('acnportal')} (ACN-Sim), period {scenario.step / 60:g} "
                  "min, round robin in steps of 0.5 A.", ""]
    elif not acn_asked:
        lines += ["acnportal was not asked for (`--acnportal`, after "
                  "`pip install -r requirements-bench.txt`).", ""]
    if sweep:
        tallies = next(iter(next(iter(sweep.values())).values()))
        lines += [
            "## Several days, tighter limits",
            "",
            f"The site on {tallies.days} simulated days (seeds {scenario.seed}–"
            f"{scenario.seed + tallies.days - 1}: {tallies.cars} cars, "
            f"{tallies.kwh_wanted:.0f} kWh wanted), under the limit above and tighter ones "
            f"(without acnportal): the energy delivered of what was wanted, and the cars that "
            f"left with less than {SHORT:.0%}.",
            "",
            sweep_table(sweep, scenario.chargers * scenario.charger_kw),
            "",
        ]
    lines += [
        f"![the site's measured power against its limit over the day]({png_name})",
        "",
        "## What the columns mean",
        "",
        "- *wanted* / *delivered*: the energy the cars wanted, and what they had of it when "
        "they left at their departure (or at midnight).",
        f"- *cars < {SHORT:.0%}*: cars that left with less than {SHORT:.0%} of what they "
        "wanted; a car short even in the uncontrolled run could not get its energy in its "
        "stay at the most it and its charger take.",
        "- *peak*: the largest measured power of the site, a step's energy ÷ its length; "
        "*min above limit*: the simulated minutes in which the site drew more than the limit "
        "(only the runs without a limit can).",
        "- *real s*: how long the run took here.",
        "",
        "## Notes",
        "",
        "- Here allocation happens once per step, from the cars' acceptance at the step's "
        "start; a car that tapers or completes within the step leaves its unused share idle "
        "until the next step. Central reallocates every `CENTRAL_ALLOCATION_INTERVAL` (2 s) "
        "and on every start and end.",
        "- The ACN-Sim schedulers see each charger's limit but not each car's: the share they "
        "give a 7.4 kW car on an 11 kW charger may go unused, where `equal` hands it to "
        "the others. Their batteries are full at 100 % (ours at 99 %). Their uncontrolled "
        "charging does not stop at the requested energy; what it delivers beyond is not "
        "counted.",
        "",
    ]
    return "\n".join(lines)


def plot(panels: Sequence[tuple[Scenario, list[Run]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.5 * len(panels)), squeeze=False)
    for ax, (scenario, runs) in zip(axes[:, 0], panels, strict=True):
        hours = [i * scenario.step / 3600 for i in range(scenario.steps)]
        for run in runs:
            style = "-" if run.name in ("equal", "least_laxity") else (
                ":" if "uncontrolled" in run.name else "--")
            ax.plot(hours, run.power_kw, style, linewidth=1.2, label=run.name)
        ax.axhline(scenario.limit_kw, color="red", linewidth=1.5,
                   label=f"site limit {scenario.limit_kw:g} kW")
        ax.set_xlim(4, 22)  # nothing happens at night
        ax.set_xticks(range(4, 23, 2))
        ax.set_xlabel("hour of the day")
        ax.set_ylabel("site's measured power (kW)")
        ax.set_title(f"limit {scenario.limit_kw:g} kW "
                     f"({scenario.limit_kw / (scenario.chargers * scenario.charger_kw):.0%} "
                     "of the chargers' sum)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=16)
    parser.add_argument("--charger-kw", type=float, default=11.0)
    parser.add_argument("--limit-fraction", type=float, default=0.5,
                        help="the site's limit as a share of its chargers' sum (0.5)")
    parser.add_argument("--sweep", default="0.25,0.15",
                        help="tighter limits to run the same cars under ('' for none)")
    parser.add_argument("--cars", type=int, default=None,
                        help="drivers that come during the day (1.3 × chargers)")
    parser.add_argument("--step", type=int, default=60, help="simulated seconds per step")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--days", type=int, default=20,
                        help="days (seeds seed, seed + 1, …) of the multi-day table (0: none)")
    parser.add_argument("--acnportal", action="store_true",
                        help="also run Caltech's acnportal (requirements-bench.txt)")
    parser.add_argument("--quick", action="store_true",
                        help="6 chargers in steps of 5 min (for the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.chargers, args.step = min(args.chargers, 6), max(args.step, 300)
    if args.cars is None:
        args.cars = round(1.3 * args.chargers)
    try:
        args.sweep = [float(f) for f in args.sweep.split(",") if f.strip()]
    except ValueError:
        parser.error("--sweep takes fractions separated by commas")
    if args.quick:
        args.days = min(args.days, 3)
    if args.chargers < 1 or args.cars < 0 or args.charger_kw <= 0 or args.days < 0:
        parser.error("--chargers and --charger-kw must be positive, --cars not negative")
    if min([args.limit_fraction, *args.sweep]) <= 0:
        parser.error("the limit fractions must be > 0")
    if args.step < 1 or DAY_SECONDS % args.step:
        parser.error("--step must divide a day")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/energy_bench.py", *(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    started = datetime.now(tz=UTC)

    def scenario_at(fraction: float) -> Scenario:
        return draw_scenario(seed=args.seed, chargers=args.chargers, charger_kw=args.charger_kw,
                             limit_fraction=fraction, step=args.step, cars=args.cars)

    scenario = scenario_at(args.limit_fraction)
    runs, acn_error = run_all(scenario, args.acnportal)
    sweep = sweep_days(args) if args.days else {}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"energy-{started:%Y-%m-%d}"
    png = args.out / f"{stem}.png"
    panels = [(scenario, runs)]
    if args.sweep:
        tightest = scenario_at(min(args.sweep))
        panels.append((tightest, run_all(tightest, acnportal=False)[0]))
    plot(panels, png, f"One site of {scenario.chargers} × {scenario.charger_kw:g} kW, "
         f"{len(scenario.arrivals)} cars (seed {scenario.seed}): measured power over the day")
    text = report(scenario, runs, sweep, acn_error, args.acnportal, command, png.name, started)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    (args.out / f"{stem}.json").write_text(json.dumps({
        "scenario": {k: v for k, v in asdict(scenario).items() if k != "arrivals"}
        | {"cars": len(scenario.arrivals), "kwh_wanted": round(scenario.kwh_wanted, 3)},
        "acnportal_error": acn_error,
        "runs": [r.summary(scenario) | {"power_kw": [round(p, 4) for p in r.power_kw],
                                        "delivered": r.delivered} for r in runs],
        "sweep": [{"limit_fraction": f, "runs": {name: asdict(t) for name, t in tallies.items()}}
                  for f, tallies in sweep.items()],
        "arrivals": [asdict(a) for a in scenario.arrivals],
    }, indent=1) + "\n", encoding="utf-8")
    print(markdown_table(HEADER, [row(r, scenario) for r in runs]))
    if acn_error:
        print(f"\nacnportal could not be run: {acn_error}")
    if sweep:
        print("\n" + sweep_table(sweep, scenario.chargers * scenario.charger_kw))
    print(f"\nreport: {args.out / (stem + '.md')}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
