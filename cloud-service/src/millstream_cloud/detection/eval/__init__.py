"""Evaluation harness: NAB and SKAB scorers, the fault simulator and the ``eval`` CLI."""

import math


class EvalInputError(ValueError):
    """An input of the harness (a benchmark file, a settings file) it cannot read.

    The message names the file and, where there is one, the line: a user pointing the
    harness at their own data needs to know what to fix, not a traceback."""


def finite_number(text: str, where: str, column: str, what: str = "a finite number") -> float:
    """``text`` as a float, or an EvalInputError naming ``where`` (file and line) and the
    column: a blank, a word or an infinity in a benchmark file stops the run."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise EvalInputError(f"{where}: {column} {text.strip()!r} is not {what}")
    return value
