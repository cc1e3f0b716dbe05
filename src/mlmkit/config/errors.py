"""The two errors a user can fix: `ConfigError` (a setting) and `DataError` (the data). Each
message names the key or file and the fix; `mlmkit.cli.run_cli` prints it as one line."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


class DataError(ValueError):
    """Unusable data (empty corpus, missing column, unsupported file); names the fix."""
