"""A module another node imports instead of functions_module: it offers `function`, not those."""

import shoal


@shoal.task
def elsewhere() -> str:
    return "elsewhere"
