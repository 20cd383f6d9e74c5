"""The entry point (`python -m xcr0run`, and the `xcr0run` command).

A plain run is parsed without click (runargs.py) and goes straight to commands.py;
everything else (help, --show, mistakes) goes through click (cli.py). Importing click
alone costs more than a launcher's whole start-up budget (docs/BENCHMARKS.md).
"""

from __future__ import annotations

# First, before any slow import: Ctrl-C while xcr0run starts must kill it with SIGINT,
# as it would kill the program (a shell loop stops only on a death by SIGINT), not raise
# KeyboardInterrupt in the middle of an import. Python installs its handler only over
# SIG_DFL, so an inherited SIG_IGN stays as it was. _signal, not signal: no enum import
# (mypy reads signal's description of the same functions).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import os  # noqa: E402 - after the SIGINT reset above, on purpose
import sys  # noqa: E402

from xcr0run import commands, runargs  # noqa: E402

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
