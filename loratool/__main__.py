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
    if interrupts.was_interrupted():
        # Outputs are already cleaned up. An import torn in half (torch's, say) may have left modules in
        # a state whose teardown misbehaves, so skip the interpreter's finalisation and leave now.
        interrupts.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
