"""Supervision: start the children in order, watch and restart them, stop them in order.

Over 400 lines: start order, supervision, restarts and the ordered stop of every
child share the one run's state and signals.

Start order: Central (wait for ``GET /health``; with --centrals N, ``central-1`` …
``central-N`` together, each waited for), with --ocpp the OCPP gateway (wait for its
``GET /health``), then the CPs: either the engines, each
engine's monitor once Central shows its CP ACTIVATED, or the CP Fleet, until Central counts
its CPs ACTIVATED (``GET /cp?state=ACTIVATED``, ``X-Total-Count``; a progress line every few
seconds); then the drivers and the load generator. Stop order (:data:`STOP_ORDER`): load,
drivers, monitors, engines, fleet, the OCPP gateway, Central. The first
SIGINT/SIGTERM/SIGHUP stops everything in that order (SIGTERM, up to ``--stop-timeout`` s
each, the fleet a little longer, then SIGKILL); a second one kills what is left at once,
as uvicorn's second Ctrl-C forces its exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator, Mapping

import httpx

from evcharging.devtools.process import DieWithParent
from evcharging.launcher.children import (
    RESTART_FIRST_DELAY,
    STABLE_RUN,
    Child,
    describe_exit,
    next_delay,
)
from evcharging.launcher.console import Console, banner
from evcharging.launcher.plan import (
    EXIT_FAILED,
    EXIT_OK,
    STOP_ORDER,
    STOP_SIGNALS,
    ChildSpec,
    LaunchOptions,
    Role,
    child_env,
    child_specs,
)

POLL_INTERVAL = 0.25
FLEET_POLL_INTERVAL = 0.5
"""Between two counts of the fleet's CPs at Central (a count is cheap, but 10,000 CPs keep
Central busy while they connect)."""
PROGRESS_EVERY = 2.0
"""Seconds between two progress lines while the fleet's CPs connect."""


class StartupError(Exception):
    """The system did not come up (a child died while starting, or a wait timed out)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the system was starting."""


class Supervisor:
    """Starts, watches, restarts and stops the children of one run."""

    def __init__(
        self,
        options: LaunchOptions,
        bootstrap: str,
        console: Console,
        environ: Mapping[str, str],
        kafka_note: str,
        own_broker: bool = False,
        *,
        db_note: str | None = None,
        own_database: bool = False,
    ) -> None:
        self.options = options
        self.bootstrap = bootstrap
        self.console = console
        self.kafka_note = kafka_note
        self.own_broker = own_broker
        self.db_note = db_note
        self.own_database = own_database
        self.specs = child_specs(options, bootstrap)
        self.children: list[Child] = []
        self.centrals: list[Child] = []
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.started = False
        self._signals = 0
        self._env = child_env(environ, console.colour)
        self._die_with_parent = DieWithParent()
        self._central_urls = [f"http://127.0.0.1:{central.http_port}"
                              for central in options.central_instances]
        self._fleet_url = f"http://127.0.0.1:{options.fleet_port}"

    # ----------------------------------------------------------------- signals

    def on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            roles = {spec.role for spec in self.specs}
            what = [role.plural for role in STOP_ORDER if role in roles]
            listed = ", ".join(what[:-1]) + (" and " if len(what) > 1 else "") + what[-1]
            after = [name for name, own in (("PostgreSQL", self.own_database),
                                            ("the Kafka broker", self.own_broker)) if own]
            self.console.warn(
                f"{sig.name} received: stopping {listed}"
                f"{', then ' + ' and '.join(after) if after else ''} "
                "(Ctrl-C again kills them at once)"
            )
            self.stopping.set()
            return
        if not self.hurry.is_set():
            self.console.warn(f"{sig.name} again: killing every process now")
        self.hurry.set()
        for child in self.children:
            child.kill()

    # ----------------------------------------------------------------- the run

    async def run(self) -> int:
        """Start everything and supervise until a stop signal; returns the exit code."""
        try:
            await self._start()
        except Interrupted:
            return EXIT_OK
        except StartupError as exc:
            self.console.error(f"the system could not start: {exc}")
            self.console.error("stopping what was started")
            return EXIT_FAILED
        self.started = True
        banner(self.console, self.options, self.kafka_note, self.db_note)
        return await self._watch()

    async def _start(self) -> None:
        by_role: dict[Role, list[ChildSpec]] = {role: [] for role in Role}
        for spec in self.specs:
            by_role[spec.role].append(spec)
        self.centrals = [self._launch(spec) for spec in by_role[Role.CENTRAL]]
        centrals = self.centrals
        began = time.monotonic()
        for central, instance in zip(centrals, self.options.central_instances, strict=True):
            url = f"http://127.0.0.1:{instance.http_port}/health"
            if instance.alone:
                self.console.say(f"waiting for Central at {url} ...")
                await self._wait_central(central, url)
                self.console.ok(f"Central is up ({time.monotonic() - began:.1f} s)")
                continue
            self.console.say(f"waiting for Central {instance.instance_id} at {url} ...")
            health = await self._wait_central(central, url)
            self.console.ok(f"Central {instance.instance_id} is up "
                            f"({time.monotonic() - began:.1f} s){_instance_note(health)}")
        if len(centrals) > 1:
            await self._wait_partitions()
        if by_role[Role.OCPP]:
            gateway = self._launch(by_role[Role.OCPP][0])
            url = f"http://127.0.0.1:{self.options.ocpp_http_port}/health"
            self.console.say(f"waiting for the OCPP gateway at {url} ...")
            began = time.monotonic()
            await self._wait_gateway(gateway, url)
            self.console.ok(
                f"the OCPP gateway is up ({time.monotonic() - began:.1f} s): chargers connect "
                f"to {self.options.ocpp_url}"
            )
        if by_role[Role.ENGINE]:
            engines = [self._launch(spec) for spec in by_role[Role.ENGINE]]
            monitors = {spec.cp_id or "": spec for spec in by_role[Role.MONITOR]}
            self.console.say(
                f"waiting for {len(engines)} CP(s) to be ACTIVATED "
                "(each monitor starts when its CP is) ..."
            )
            began = time.monotonic()
            await self._wait_cps(engines, monitors)
            self.console.ok(
                f"every CP is ACTIVATED ({time.monotonic() - began:.1f} s)"
            )
        if by_role[Role.FLEET]:
            fleet = self._launch(by_role[Role.FLEET][0])
            self.console.say(
                f"waiting for the CP Fleet's {self.options.cps:,} CPs to be ACTIVATED at "
                "Central ..."
            )
            began = time.monotonic()
            await self._wait_fleet(fleet)
            self.console.ok(
                f"every CP is ACTIVATED: {self.options.cps:,} CPs in "
                f"{time.monotonic() - began:.1f} s"
            )
        for spec in by_role[Role.DRIVER] + by_role[Role.LOAD] + by_role[Role.PROMETHEUS]:
            self._launch(spec)

    async def _wait_central(self, central: Child, url: str) -> object:
        """Until this Central's ``/health`` answers 200 (every Central of the run must stay
        up meanwhile); returns the body of that answer."""
        who = "Central" if central.name == "central" else f"Central {central.name}"
        deadline = time.monotonic() + self.options.start_timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(*self.centrals)
                try:
                    response = await http.get(url)
                    if response.status_code == 200:
                        return _json_or_none(response)
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"{who} did not answer GET {url} with 200 within "
                        f"{self.options.start_timeout:g} s (last: {last}); see the "
                        f"{central.name} lines above; is Kafka reachable at {self.bootstrap}? "
                        "(--start-timeout changes the wait)"
                    )
                await self._pause()

    async def _wait_partitions(self) -> None:
        """With several Centrals whose ``/health`` lists the partitions each owns (SPEC §9):
        until their group has settled (no partition owned twice, and every instance owns
        one, or as many as there are partitions do), so that the CPs start with their
        owners in place. Not settled within ``--start-timeout``: a warning, and on."""
        deadline = time.monotonic() + self.options.start_timeout
        began = time.monotonic()
        owned: list[list[int] | None] = []
        self.console.say("waiting for the Centrals to share the partitions ...")
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(*self.centrals)
                owned = [await _partitions(http, url) for url in self._central_urls]
                if any(found is None for found in owned):
                    if all(found is None for found in owned) and owned:
                        return  # a Central that does not report its partitions
                elif partitions_settled([found or [] for found in owned]):
                    break
                if time.monotonic() >= deadline:
                    self.console.warn(
                        "the Centrals did not settle on the partitions within "
                        f"{self.options.start_timeout:g} s ({_ownership(self.centrals, owned)}); "
                        "starting the rest anyway"
                    )
                    return
                await self._pause()
        self.console.ok(f"the Centrals share the partitions ({time.monotonic() - began:.1f} s):"
                        f" {_ownership(self.centrals, owned)}")

    async def _wait_gateway(self, gateway: Child, url: str) -> None:
        """Until the OCPP gateway's ``/health`` answers 200 (it listens and reaches Kafka)."""
        deadline = time.monotonic() + self.options.start_timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(*self.centrals, gateway)
                try:
                    response = await http.get(url)
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"the OCPP gateway did not answer GET {url} with 200 within "
                        f"{self.options.start_timeout:g} s (last: {last}); see the ocpp "
                        "lines above (--start-timeout changes the wait)"
                    )
                await self._pause()

    async def _wait_cps(self, engines: list[Child], monitors: Mapping[str, ChildSpec]) -> None:
        """Until Central shows every engine's CP ACTIVATED; starts each CP's monitor then.
        With several Centrals, a CP is ACTIVATED when one of them shows it so (its owner
        does first)."""
        wanted = [engine.spec.cp_id or "" for engine in engines]
        waiting_monitors = dict(monitors)
        started_monitors: list[Child] = []
        deadline = time.monotonic() + self.options.start_timeout
        states: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                self._check_starting(*self.centrals, *engines, *started_monitors)
                polled = [await _cp_states(http, url) for url in self._central_urls]
                for cp_id in {cp_id for found in polled for cp_id in found}:
                    told = [found[cp_id] for found in polled if cp_id in found]
                    states[cp_id] = "ACTIVATED" if "ACTIVATED" in told else told[0]
                for cp_id in list(waiting_monitors):
                    if states.get(cp_id) == "ACTIVATED":
                        started_monitors.append(self._launch(waiting_monitors.pop(cp_id)))
                if all(states.get(cp_id) == "ACTIVATED" for cp_id in wanted):
                    return
                if time.monotonic() >= deadline:
                    summary = ", ".join(
                        f"{cp_id} {states.get(cp_id, 'unknown to Central')}" for cp_id in wanted
                    )
                    raise StartupError(
                        f"not every CP was ACTIVATED within {self.options.start_timeout:g} s "
                        f"({summary}); see the cp-e lines above (--start-timeout changes "
                        "the wait)"
                    )
                await self._pause()

    async def _wait_fleet(self, fleet: Child) -> None:
        """Until Central shows ACTIVATED every CP the fleet has connected and ACTIVATED.

        Central's count is the ``X-Total-Count`` of ``GET /cp?state=ACTIVATED&limit=1``; the
        fleet's ``/health`` says how many of its CPs are still DISCONNECTED (not connected
        yet) and how many are ACTIVATED (a CP of its random faults may be in FAULT). Gives
        up after ``--start-timeout`` seconds in which neither count grew.
        """
        total = self.options.cps
        began = last_progress = time.monotonic()
        next_line = began + PROGRESS_EVERY
        seen: tuple[int, int] = (-1, -1)
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            while True:
                self._check_starting(*self.centrals, fleet)
                # Every Central answers for the whole network (SPEC §9): the highest count
                # of those that answer.
                counts = [await _activated_at_central(http, url) for url in self._central_urls]
                answered = [count for count in counts if count is not None]
                at_central = max(answered) if answered else None
                states = await _fleet_states(http, self._fleet_url)
                connected = total - states.get("DISCONNECTED", total)
                activated = states.get("ACTIVATED", 0)
                now = time.monotonic()
                if (at_central or 0) > seen[0] or connected > seen[1]:
                    seen = (max(seen[0], at_central or 0), max(seen[1], connected))
                    last_progress = now
                if connected == total and at_central is not None and at_central >= activated:
                    return
                if now >= next_line:
                    next_line = now + PROGRESS_EVERY
                    self.console.say(
                        f"  {_count_text(at_central)}/{total:,} CPs ACTIVATED at Central "
                        f"(the fleet has connected {max(connected, 0):,}), "
                        f"{now - began:.0f} s"
                    )
                if now - last_progress >= self.options.start_timeout:
                    raise StartupError(
                        f"the CP Fleet's CPs stopped coming up: {_count_text(at_central)} of "
                        f"{total:,} ACTIVATED at Central and {max(connected, 0):,} connected by "
                        f"the fleet, with no progress for {self.options.start_timeout:g} s; "
                        "see the cp-fleet and central lines above (--start-timeout changes "
                        "the wait)"
                    )
                await self._pause(FLEET_POLL_INTERVAL)

    def _check_starting(self, *children: Child) -> None:
        if self.stopping.is_set():
            raise Interrupted
        for child in children:
            if child.ended:
                raise StartupError(
                    f"{child.name} exited while starting ({describe_exit(child.last_code)}); "
                    "see its lines above"
                )

    async def _pause(self, seconds: float = POLL_INTERVAL) -> None:
        if await self._stopping_within(seconds):
            raise Interrupted

    async def _stopping_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _watch(self) -> int:
        """Until a stop signal, or until every child ended for good."""
        remaining = {child.task for child in self.children if child.task is not None}
        drivers = {c.task for c in self.children if c.spec.role is Role.DRIVER and c.task}
        stopper = asyncio.create_task(self.stopping.wait(), name="stop-signal")
        try:
            while remaining and not self.stopping.is_set():
                done, _ = await asyncio.wait(
                    remaining | {stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                remaining -= done
                if drivers and all(task.done() for task in drivers):
                    drivers = set()
                    if not self.stopping.is_set():
                        self.console.ok(
                            f"every driver is done; the system keeps running. Dashboard: "
                            f"http://localhost:{self.options.http_port}/ (Ctrl-C to stop)"
                        )
        finally:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        if self.stopping.is_set():
            return EXIT_OK
        failed = [child.name for child in self.children if child.failed]
        self.console.error(
            "every process has ended; nothing left to run"
            + (f" (failed: {', '.join(failed)})" if failed else "")
        )
        return EXIT_FAILED if failed else EXIT_OK

    # ----------------------------------------------------------------- children

    def _launch(self, spec: ChildSpec) -> Child:
        child = Child(spec)
        self.children.append(child)
        child.task = asyncio.create_task(self._supervise(child), name=f"supervise {spec.name}")
        return child

    async def _supervise(self, child: Child) -> None:
        try:
            await self._supervise_loop(child)
        except Exception as exc:  # noqa: BLE001 - a launcher bug must be seen, not swallowed
            child.failed = True
            self.console.error(f"internal error while supervising {child.name}: {exc!r}")

    async def _supervise_loop(self, child: Child) -> None:
        """Run the child; report its death; restart it with backoff if asked to."""
        delay = RESTART_FIRST_DELAY
        while True:
            began = time.monotonic()
            try:
                code = await child.run_once(self._env, self.console, self._die_with_parent)
            except OSError as exc:
                self.console.error(f"cannot start {child.name}: {exc}")
                child.failed = True
                return
            child.last_code = code
            ran = time.monotonic() - began
            if self.stopping.is_set() or child.stop_requested:
                return
            if code == 0:
                if child.spec.role is Role.DRIVER:
                    self.console.ok(f"{child.name} finished its requests file (exit code 0)")
                elif child.spec.role is Role.LOAD:
                    self.console.ok(
                        f"{child.name} finished its run (exit code 0; its summary is above); "
                        "the system keeps running"
                    )
                else:
                    self.console.warn(
                        f"{child.name} exited by itself with exit code 0"
                        + (" (Central sent SHUTDOWN)" if child.spec.role is Role.ENGINE else "")
                        + "; not restarted"
                    )
                return
            child.failed = True
            child.report_death(self.console, code, ran)
            if not self.options.restart:
                if child.spec.role is Role.CENTRAL and self.started:
                    self._central_is_down(child)
                return
            if ran >= STABLE_RUN:
                delay = RESTART_FIRST_DELAY
            self.console.warn(
                f"restarting {child.name} in {delay:g} s (--restart; restart #{child.runs})"
            )
            if await self._stopping_within(delay):
                return
            delay = next_delay(delay)

    def _central_is_down(self, child: Child) -> None:
        others = [c.name for c in self.centrals if c is not child and not c.ended]
        if others:  # SPEC §9: the others take its partitions over
            self.console.error(
                f"!!! {child.name} IS DOWN: its CPs go over to {' and '.join(others)}, "
                f"which {'serves' if len(others) == 1 else 'serve'} the whole network; its "
                "dashboard is gone. `--restart` would have restarted it."
            )
            return
        if len(self.centrals) > 1:
            self.console.error("!!! EVERY CENTRAL IS DOWN")
        for text in (
            "!!! EV CENTRAL IS DOWN: no request can be accepted, the dashboard "
            f"http://localhost:{self.options.http_port}/ is gone, the monitors cannot report.",
            "!!! The other processes keep running. Ctrl-C stops everything; "
            "`--restart` would have restarted Central.",
        ):
            self.console.error(text)

    # ----------------------------------------------------------------- stop

    async def shutdown(self) -> None:
        """Stop every child in order: drivers, monitors, engines, Central."""
        self.stopping.set()
        for role in STOP_ORDER:
            group = [child for child in self.children if child.spec.role is role]
            live = [child.name for child in group if child.running]
            if live and not self.hurry.is_set():
                self.console.say(f"stopping {role.plural}: {', '.join(live)}")
            timeout = (self.options.fleet_stop_timeout if role is Role.FLEET
                       else self.options.stop_timeout)
            await asyncio.gather(*(c.stop(self.console, timeout, self.hurry) for c in group))
        killed = [child.name for child in self.children if child.killed]
        if killed:
            self.console.warn(f"killed (SIGKILL): {', '.join(killed)}")
        if len(self.children) > 1:
            self.console.ok(f"all {len(self.children)} processes have stopped")
        elif self.children:
            self.console.ok("the process has stopped")


async def _cp_states(http: httpx.AsyncClient, base_url: str) -> dict[str, str]:
    """The state of each CP one Central lists (``not seen yet`` for one it has not heard
    from since it started: a state reloaded from the database is stale); empty while it
    does not answer."""
    try:
        response = await http.get(f"{base_url}/cp")
        body = response.json() if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        body = []
    states = {}
    for cp in body if isinstance(body, list) else []:
        if isinstance(cp, dict) and isinstance(cp.get("cp_id"), str):
            seen = cp.get("last_seen") is not None
            states[cp["cp_id"]] = str(cp.get("state")) if seen else "not seen yet"
    return states


async def _activated_at_central(http: httpx.AsyncClient, base_url: str) -> int | None:
    """How many CPs Central lists ACTIVATED; None while it does not answer."""
    try:
        response = await http.get(f"{base_url}/cp", params={"state": "ACTIVATED", "limit": 1})
        if response.status_code == 200:
            return int(response.headers["X-Total-Count"])
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    return None


async def _fleet_states(http: httpx.AsyncClient, fleet_url: str) -> dict[str, int]:
    """The fleet's CPs by state, from its ``/health``; empty while it does not answer."""
    try:
        response = await http.get(f"{fleet_url}/health")
        states = response.json().get("states")
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}
    if not isinstance(states, dict):
        return {}
    return {str(k): v for k, v in states.items() if isinstance(v, int)}


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _instance_note(health: object) -> str:
    """What a Central's ``/health`` says of its place among several (SPEC §9): its id,
    when it reports it."""
    if isinstance(health, dict) and isinstance(health.get("instance"), str):
        return f": instance {health['instance']}"
    return ""


async def _partitions(http: httpx.AsyncClient, base_url: str) -> list[int] | None:
    """The partitions a Central's ``/health`` says it owns; None when it does not say (or
    does not answer)."""
    try:
        found = (await http.get(f"{base_url}/health")).json().get("partitions")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(found, list) or not all(isinstance(p, int) for p in found):
        return None
    return sorted(found)


def partitions_settled(owned: list[list[int]]) -> bool:
    """Whether the Centrals' partitions look like a settled group: none owned twice, and
    as many instances own some as can (all of them, or one per partition)."""
    every = [p for found in owned for p in found]
    if not every or len(every) != len(set(every)):
        return False
    return sum(1 for found in owned if found) == min(len(owned), len(every))


def _ownership(centrals: list[Child], owned: list[list[int] | None]) -> str:
    return ", ".join(f"{child.name} {'?' if found is None else found}"
                     for child, found in zip(centrals, owned, strict=False))


def _count_text(count: int | None) -> str:
    return "?" if count is None else f"{count:,}"


@contextlib.contextmanager
def signals_to(supervisor: Supervisor) -> Iterator[None]:
    """While inside: :data:`STOP_SIGNALS` go to ``supervisor.on_signal`` (in its event loop)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, supervisor.on_signal, sig)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def supervise(supervisor: Supervisor) -> tuple[int, bool]:
    """Run the system until it stops; returns the exit code and whether a second signal
    forced the stop."""
    with signals_to(supervisor):
        try:
            code = await supervisor.run()
        finally:
            await supervisor.shutdown()
    return code, supervisor.hurry.is_set()
