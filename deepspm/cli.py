"""The `deepspm` command: parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _fsm(args: argparse.Namespace) -> int:
    from deepspm.fsm.diagram import mermaid

    print(mermaid(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepspm",
        description="Autonomous STM controller (DeepSPM re-implemented) speaking the Nanonis TCP protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fsm = sub.add_parser("fsm", help="print the run's state machine", description="Print the run's state machine.")
    fsm.add_argument("--mermaid", action="store_true", default=True, help="as a Mermaid stateDiagram-v2 (the default)")
    fsm.set_defaults(func=_fsm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
