"""User-facing errors: one line that says what is wrong and what to do."""


class PmdError(Exception):
    """A configuration, input or dependency problem that stops the run with a one-line message."""


class StopBuild(PmdError):
    """A problem no retry of a shard can help (a link inside OUT): the whole run stops, once."""
