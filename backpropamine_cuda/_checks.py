"""Type predicates of the argument checks in modules.py, rollout.py, fused.py and measure.py.
Python counts a bool as an int (True == 1), which no size, count or bound here means."""

import numbers


def is_int(value):
    """A Python int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value):
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
