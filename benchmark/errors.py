"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class CfbenchError(Exception):
    """A user-facing error: bad input, missing data, unusable configuration."""


class ResumeRefused(CfbenchError):
    """A checkpoint that does not fit the run it would continue, found once the run folder is held:
    the folder is left as it was (no error line recorded, no log line), as for any refusal."""


class CfbenchProblems(CfbenchError):
    """Several independent problems found in one pass (`run --check`): the CLI prints a count and
    one line per problem; anywhere else it reads as one line."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__(f"{len(self.lines)} problems: " + " | ".join(self.lines))
