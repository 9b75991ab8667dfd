"""`python -m loratool` and the `loratool` console script.

Imports nothing heavy before the interrupt handlers are in place: a Ctrl-C during the torch import
then gives one line and exit 130, not a traceback.
"""

import sys


def main() -> int:
    from . import interrupts

    interrupts.install()
    from .cli import main as cli_main

    code = cli_main()
    if interrupts.was_interrupted() or "torch" in sys.modules:
        # Every output is closed, fsynced and renamed (or cleaned up) by now. Once torch is imported the
        # interpreter's teardown takes most of a second (0.8 s measured on 2 cores), and after an
        # interrupt an import torn in half may leave modules whose teardown misbehaves: skip it.
        interrupts.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
