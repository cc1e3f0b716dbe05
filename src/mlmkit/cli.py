"""The entry points' error handling: a mistake of the user's is one line and exit status 2."""

from __future__ import annotations

import sys

from mlmkit.config.errors import ConfigError, DataError, error_line

__all__ = ["error_line", "run_cli"]


def run_cli(main) -> None:
    """Call ``main()``; a ConfigError or DataError (bad input, with its fix) is printed as one
    ``mlmkit: error: ... Fix: ...`` line, without a traceback, and ends the process with status
    2. Anything else is a bug and keeps its traceback (and the run folder keeps nothing that
    looks finished: summary.json and model/ are written last)."""
    try:
        main()
    except (ConfigError, DataError) as err:
        print(error_line(err), file=sys.stderr)
        sys.exit(2)
