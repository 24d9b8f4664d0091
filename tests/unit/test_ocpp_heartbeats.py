"""The gateway's periodic heartbeats on a recording publisher: every CP beats once a round,
spread over the interval in slices rather than all at once (thousands at once held the
event loop for a quarter of a second)."""

from __future__ import annotations

import asyncio
import contextlib

from evcharging.apps.ev_ocpp import gateway as gateway_module
from evcharging.apps.ev_ocpp.gateway import Gateway
from evcharging.common.messages import CPStatus, Message, StatusEvent
from tests.unit.fakes import RecordingPublisher


class TimedPublisher(RecordingPublisher):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def publish(self, message: Message, *, wait: bool = True) -> None:
        self.times.append(asyncio.get_running_loop().time())
        await super().publish(message, wait=wait)


async def test_every_cp_beats_once_a_round_in_slices_spread_over_the_interval() -> None:
    bus = TimedPublisher()
    interval = 0.6
    gw = Gateway(bus, status_interval=interval)
    cps = [gw.connector(f"CH-{n:03d}", 1).cp_id for n in range(120)]  # 3 slices: 50, 50, 20
    began = asyncio.get_running_loop().time()
    beating = asyncio.create_task(gw.beat_forever())
    try:
        beats = await bus.wait_count(
            CPStatus, len(cps), lambda s: s.event is StatusEvent.HEARTBEAT, timeout=5)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    assert sorted(b.cp_id for b in beats) == sorted(cps)  # each once in the round
    # Slice k (1, 2, 3) goes out no earlier than k thirds of the interval into the round.
    size, step = gateway_module._BEAT_SLICE, interval / 3
    for index, at in enumerate(bus.times[:len(cps)]):
        assert at >= began + (index // size + 1) * step - 0.001, index
    assert bus.times[len(cps) - 1] - bus.times[0] >= step / 2  # not one burst
