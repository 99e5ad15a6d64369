"""The two ways a run can fail on purpose: bad input from the user, and an intervention that does
not reach the model."""


class UsageError(ValueError):
    """Bad input (a path, an argument, a file's contents): the scripts print it as one line on
    stderr and exit with status 2, no traceback. A ValueError, so library callers may catch either."""


class SteeringError(RuntimeError):
    """An installed intervention did not change the model (it would silently measure nothing)."""
