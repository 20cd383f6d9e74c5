"""The entry point (`python -m xcr0run`, and the `xcr0run` command).

A plain run is parsed without click (runargs.py) and goes straight to commands.py;
everything else (help, --show, mistakes) goes through click (cli.py). Importing click
alone costs more than a launcher's whole start-up budget (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import sys

from xcr0run import commands, runargs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else list(argv)

    def start() -> int:
        line = runargs.parse(args, os.environ)
        if line is None:
            from xcr0run import cli

            cli.main(args)
        return commands.dispatch(line)

    commands.finish(start)


if __name__ == "__main__":
    main()
