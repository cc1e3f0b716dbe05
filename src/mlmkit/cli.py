"""The entry points' error handling: a mistake of the user's is one line and exit status 2."""

from __future__ import annotations

import sys


def run_cli(main) -> None:
    """Call ``main()``; a ConfigError or DataError (bad input, with its fix) is printed as
    ``mlmkit: error: ...`` and ends the process with status 2. Anything else is a bug and keeps
    its traceback."""
    from .configio import ConfigError
    from .data import DataError
    try:
        main()
    except (ConfigError, DataError) as err:
        print(f"mlmkit: error: {err}", file=sys.stderr)
        sys.exit(2)
