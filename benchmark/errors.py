"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class CfbenchError(Exception):
    """A user-facing error: bad input, missing data, unusable configuration."""


class CfbenchProblems(CfbenchError):
    """Several independent problems found in one pass (`run --check`): the CLI prints a count and
    one line per problem; anywhere else it reads as one line."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__(f"{len(self.lines)} problems: " + " | ".join(self.lines))
