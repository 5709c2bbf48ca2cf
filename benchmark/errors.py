"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class CfbenchError(Exception):
    """A user-facing error: bad input, missing data, unusable configuration."""
