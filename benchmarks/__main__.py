"""``python -m benchmarks`` (what ``policer bench`` runs from a checkout)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policer bench",
                                     description="measure decisions/s and latency")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
