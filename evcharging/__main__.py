"""``python -m evcharging``: the project's command line.

Commands (``python -m evcharging --help`` lists them):

``run``
    start the whole system locally (see :mod:`evcharging.launcher`); ``make run`` calls it.

A new command is a module with an ``add_parser(subparsers)`` function that registers its
sub-parser and sets ``handler`` (a function of the parsed arguments returning an exit
code); add it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from evcharging import launcher

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

PROG = "python -m evcharging"

COMMANDS: tuple[Callable[[Subparsers], argparse.ArgumentParser], ...] = (launcher.add_parser,)
"""Each registers one sub-command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="EV charging network: event-driven simulation over Apache Kafka.",
        epilog=f"`{PROG} COMMAND --help` describes a command. The services themselves run "
        "as `python -m evcharging.apps.<service>.main` (ev_central, ev_cp_e, ev_cp_m, "
        "ev_driver).",
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
