"""A module whose import waits at the Gate named by STUCK_GATE (until the test opens it, or
dies): a node that imports it waits for its workers."""

import os

import shoal
from tests.integration.functions_module import STUCK_GATE, wait_at

wait_at(os.environ[STUCK_GATE])


@shoal.task
def never() -> None:
    return None
