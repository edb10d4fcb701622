"""The functions bench/functions.py calls (its node imports this module)."""

import shoal


@shoal.task
def trivial() -> None:
    return None


@shoal.task
def square(x: int) -> int:
    return x * x
