"""The two errors a user can fix: `ConfigError` (a setting) and `DataError` (the data). Each
message names the key or file and the fix; `error_line` prints it as one line, for the recipes
(`mlmkit.cli.run_cli`) and the module commands (`exit_status`) alike."""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


class DataError(ValueError):
    """Unusable data (empty corpus, missing column, unsupported file); names the fix."""


def error_line(err: BaseException) -> str:
    """``mlmkit: error: <message>`` on one line (a message's own line breaks become spaces), so
    that the error and its ``Fix:`` stay together in a log that interleaves processes."""
    return "mlmkit: error: " + " ".join(part.strip() for part in str(err).splitlines()
                                        if part.strip())


def exit_status(main, argv: list[str] | None = None) -> int:
    """A module command's status: ``main(argv)``, then 0; or, for a ConfigError or DataError (a
    mistake of the user's, with its fix), 2 after its `error_line` on stderr. Anything else is a
    bug and keeps its traceback."""
    try:
        main(argv)
    except (ConfigError, DataError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    return 0
