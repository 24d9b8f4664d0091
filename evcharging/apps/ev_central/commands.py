"""The operator's commands, listed once (SPEC §5, §6): the HTTP routes
(``POST /cp/{cp_id}/stop``, ``/resume``), the TCP plane's ``STOP_CP`` and ``RESUME_CP`` and
``ctl``'s ``stop`` and ``resume`` are made from :data:`COMMANDS`, and every door runs them
through :func:`~evcharging.apps.ev_central.network.run_command`: here when this instance
owns the CP, else at its owner. Data only, so that ``ctl`` imports it cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from evcharging.common.messages import CommandType

if TYPE_CHECKING:
    from evcharging.apps.ev_central.views import CPView

__all__ = ["COMMANDS", "Command", "Operated"]


class Operated(Protocol):
    """What the commands need of Central's ``Controller``."""

    async def stop_cp(self, cp_id: str, reason: str = ...) -> CPView: ...

    async def resume_cp(self, cp_id: str, reason: str = ...) -> CPView: ...


@dataclass(frozen=True)
class Command:
    """One operator command: its TCP name, its HTTP action and ``ctl`` word, its text."""

    name: CommandType
    action: str
    help: str
    default_reason: str

    def path(self, cp_id: str) -> str:
        return f"/cp/{cp_id}/{self.action}"

    async def run_local(self, controller: Operated, cp_id: str, reason: str | None) -> CPView:
        act = controller.stop_cp if self.name is CommandType.STOP_CP else controller.resume_cp
        return await act(cp_id, reason or self.default_reason)


COMMANDS: dict[str, Command] = {
    command.name.value: command for command in (
        Command(CommandType.STOP_CP, "stop", "stop a CP (administrative STOP_CP)",
                "stopped by operator"),
        Command(CommandType.RESUME_CP, "resume", "resume a stopped CP (RESUME_CP)",
                "resumed by operator"),
    )
}
