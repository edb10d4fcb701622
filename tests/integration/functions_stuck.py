"""A module whose import takes a minute: a node that imports it waits for its workers."""

import time

import shoal

time.sleep(60)


@shoal.task
def never() -> None:
    return None
