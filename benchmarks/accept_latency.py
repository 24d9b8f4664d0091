"""Request → ACCEPTED latency of EV Central over a real Kafka broker.

Starts (unless --kafka-bootstrap is given) a local broker, a real Central process and
real CP Engine processes, then sends requests as a driver would and measures, for each,
the time from publishing the DriverRequest to receiving its ACCEPTED DriverUpdate.
Sessions are kept short and each CP is used again only once it is free.

    .venv/bin/python benchmarks/accept_latency.py --requests 200 --cps 4

Prints p50, p90, p99 and max in milliseconds. Not a test: nothing is asserted.

With ``--scrape`` a Prometheus-like client GETs Central's ``/metrics`` every second while
the requests run (the cost of being scraped on Central's hot path), and the number of
scrapes and their mean time are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evcharging.common.kafka import KafkaBus, KafkaConfig, KafkaConsumerLoop, Routes
from evcharging.common.messages import (
    DriverRequest,
    DriverStatus,
    DriverUpdate,
    new_id,
)
from evcharging.devtools.kafka_broker import KafkaBroker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def scrape_every_second(url: str, took: list[float]) -> None:
    """GET `url` every second, as Prometheus would (its answer is not read further)."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            started = time.perf_counter()
            answer = await http.get(url)
            answer.raise_for_status()
            took.append(time.perf_counter() - started)
            await asyncio.sleep(1.0)


async def measure(
    bootstrap: str, requests: int, cps: int, work: Path, scrapes: list[float] | None = None
) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    http_port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CENTRAL_TOPIC_PREFIX": prefix,
        "CP_ENGINE_TOPIC_PREFIX": prefix,
        "CENTRAL_DB_PATH": str(work / "bench.db"),
        "CENTRAL_LOG_LEVEL": "WARNING",
        "CP_ENGINE_LOG_LEVEL": "WARNING",
        "CP_ENGINE_SESSION_SECONDS": "0.2",
        "CP_ENGINE_TELEMETRY_INTERVAL": os.environ.get("BENCH_TELEMETRY_INTERVAL", "0.1"),
    }
    log = (work / "services.log").open("ab")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "evcharging.apps.ev_central.main", "--kafka-bootstrap", bootstrap,
         "--http-port", str(http_port), "--listen-port", str(free_port())],
        cwd=ROOT, env=env, stdout=log, stderr=log,
    )]
    cp_ids = [f"CP-B{i:03d}" for i in range(cps)]
    for cp_id in cp_ids:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "evcharging.apps.ev_cp_e.main", "--kafka-bootstrap", bootstrap,
             "--cp-id", cp_id, "--health-port", str(free_port())],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        ))
    config = KafkaConfig(bootstrap=bootstrap, client_id="bench", topic_prefix=prefix)
    bus = KafkaBus(config)
    sent: dict[str, float] = {}
    accepted: dict[str, float] = {}
    finished: dict[str, asyncio.Event] = {}

    async def on_update(update: DriverUpdate) -> None:
        now = time.perf_counter()
        if update.status is DriverStatus.ACCEPTED:
            accepted.setdefault(update.request_id, now)
        if update.status.is_final and update.request_id in finished:
            finished[update.request_id].set()

    consumer = KafkaConsumerLoop(config, Routes().add(DriverUpdate, on_update))
    try:
        await bus.start()
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    cps_now = (await http.get("/cp")).json()
                    if sum(cp["state"] == "ACTIVATED" for cp in cps_now) == cps:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            else:
                raise SystemExit("the CPs did not come up; see " + str(work / "services.log"))

        async def lane(cp_id: str, count: int) -> None:
            for _ in range(count):
                request_id = new_id()
                finished[request_id] = asyncio.Event()
                sent[request_id] = time.perf_counter()
                await bus.publish(DriverRequest(
                    request_id=request_id, driver_id="bench", cp_id=cp_id))
                await asyncio.wait_for(finished[request_id].wait(), 30)

        scraper = None if scrapes is None else asyncio.create_task(
            scrape_every_second(f"http://127.0.0.1:{http_port}/metrics", scrapes))
        share = [requests // cps + (1 if i < requests % cps else 0) for i in range(cps)]
        await asyncio.gather(*(lane(cp_id, n) for cp_id, n in zip(cp_ids, share, strict=True)))
        task.cancel()
        if scraper is not None:
            if scraper.done():
                scraper.result()  # a failed scrape fails the run
            scraper.cancel()
    finally:
        await consumer.stop()
        await bus.stop()
        for proc in procs:
            proc.send_signal(2)
        for proc in procs:
            proc.wait(20)
        log.close()
    return [(accepted[r] - sent[r]) * 1000 for r in sent if r in accepted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests to time")
    parser.add_argument("--cps", type=int, default=4, help="CP engines (lanes in parallel)")
    parser.add_argument("--kafka-bootstrap", help="use this broker instead of a local one")
    parser.add_argument("--scrape", action="store_true",
                        help="GET Central's /metrics every second meanwhile (as Prometheus)")
    args = parser.parse_args()
    scrapes: list[float] | None = [] if args.scrape else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.kafka_bootstrap:
            latencies = asyncio.run(measure(args.kafka_bootstrap, args.requests, args.cps, work,
                                            scrapes))
        else:
            with KafkaBroker(work_dir=work / "kafka") as broker:
                latencies = asyncio.run(measure(broker.bootstrap, args.requests, args.cps,
                                                work, scrapes))
    print(f"request → ACCEPTED over Kafka, {len(latencies)} requests on {args.cps} CPs:")
    print(f"  p50 {percentile(latencies, 50):7.2f} ms")
    print(f"  p90 {percentile(latencies, 90):7.2f} ms")
    print(f"  p99 {percentile(latencies, 99):7.2f} ms")
    print(f"  max {max(latencies):7.2f} ms   mean {statistics.fmean(latencies):.2f} ms")
    if scrapes is not None:
        mean = statistics.fmean(scrapes) * 1000 if scrapes else float("nan")
        print(f"  while scraped: {len(scrapes)} GET /metrics, {mean:.2f} ms each on average")
    load1, load5, _ = os.getloadavg()
    print(f"  machine: {os.cpu_count()} CPUs, load average {load1:.2f} (1 min), "
          f"{load5:.2f} (5 min)")


if __name__ == "__main__":
    main()
