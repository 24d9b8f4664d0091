"""Process and port helpers shared by the launcher and the local Kafka broker (POSIX).

Ports: whether one is free (:func:`port_free`), a free one (:func:`free_port`), whether
something accepts connections on one (:func:`tcp_accepts`). Processes: tie a child to its
parent (:class:`DieWithParent`), signal a pid that may be gone (:func:`signal_pid`), whether
a pid is alive (:func:`pid_alive`) and what it runs (:func:`read_cmdline`), and stop one with
SIGTERM, then SIGKILL (:func:`terminate`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DieWithParent",
    "SurvivedKill",
    "free_port",
    "pid_alive",
    "port_free",
    "read_cmdline",
    "signal_pid",
    "tcp_accepts",
    "terminate",
]

_PR_SET_PDEATHSIG = 1
KILL_WAIT = 10.0
"""Seconds to wait for a process to disappear after SIGKILL."""
_POLL = 0.05


class SurvivedKill(RuntimeError):
    """A process was still alive after SIGKILL (stuck in the kernel, or not ours to kill)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"pid {pid} survived SIGKILL")
        self.pid = pid


# --------------------------------------------------------------------------- ports


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a server could listen on ``port`` now (with SO_REUSEADDR, as servers and the
    JVM bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)
"""The ports :func:`free_port` gave lately: the kernel may offer one again before the
caller has bound it (two ports asked for in a row, for a server's HTTP and TCP)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, and that this process was
    not given lately."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise OSError(f"no free port on {host} that was not handed out already")


def tcp_accepts(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts a TCP connection on ``host:port`` within ``timeout`` s."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        return prctl
    return None


class DieWithParent:
    """``preexec_fn``: the kernel sends the child SIGTERM when its parent dies (Linux).

    Without it a SIGKILLed parent would leave its children running. If the parent died
    between fork and prctl, the child exits at once instead. Create it in the parent, before
    forking (libc is looked up then: no dlopen between fork and exec). The signal comes when
    the *thread* that forked ends, so fork from a thread that lives as long as the process.
    """

    def __init__(self) -> None:
        self._parent = os.getpid()
        self._prctl = _prctl()

    @property
    def supported(self) -> bool:
        """Whether the kernel can do it here (Linux with a loadable libc)."""
        return self._prctl is not None

    def __call__(self) -> None:
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != self._parent:
            os._exit(1)


def signal_pid(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid``; False when there is no such process any more."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def read_cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid``; None when it is gone or there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _is_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(
        line.startswith("State:") and "Z" in line.split()[1:2] for line in status.splitlines()
    )


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; an exited child of ours is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def terminate(
    pid: int,
    timeout: float,
    *,
    alive: Callable[[], bool] | None = None,
    before_kill: Callable[[], None] | None = None,
) -> bool:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL and wait up to :data:`KILL_WAIT` s.

    ``alive`` says whether the process still runs (default :func:`pid_alive`);
    ``before_kill`` is called before SIGKILL (to say why). Returns whether the process exited
    without SIGKILL; raises :class:`SurvivedKill` when even SIGKILL did not end it.
    """
    is_alive = alive or functools.partial(pid_alive, pid)
    if not is_alive():
        return True
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, KILL_WAIT)):
        if sig == signal.SIGKILL and before_kill is not None:
            before_kill()
        signal_pid(pid, sig)
        deadline = time.monotonic() + wait
        while is_alive():
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        else:
            return sig == signal.SIGTERM
    raise SurvivedKill(pid)
