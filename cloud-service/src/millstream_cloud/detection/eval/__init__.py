"""Evaluation harness: NAB and SKAB scorers, the fault simulator and the ``eval`` CLI."""


class EvalInputError(ValueError):
    """An input of the harness (a benchmark file, a settings file) it cannot read.

    The message names the file and, where there is one, the line: a user pointing the
    harness at their own data needs to know what to fix, not a traceback."""
