"""The node's slots: at most `total` tasks run at once, whoever sent them."""

from __future__ import annotations

import asyncio
import collections

__all__ = ["Slots"]


class Slots:
    """A first-come first-served count of free slots.

    Coordinator-assigned runs `take` one, waiting their turn (the coordinator does not know of
    the node's direct runs, so it may assign more than are free); direct runs `try_take` one and
    are refused when none is free. Every slot taken is given back exactly once with `give`.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        """Slots a new run could have now (0 while runs wait for one)."""
        return 0 if self._waiting else max(0, self.total - self.held)

    def try_take(self) -> bool:
        """Take a slot if one is free now; never waits."""
        if self.free == 0:
            return False
        self.held += 1
        return True

    async def take(self) -> None:
        """Take a slot, waiting behind earlier takers until one is given back."""
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as it was cancelled: pass it on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    def give(self) -> None:
        """Give a slot back: to the first run still waiting, else to the pool."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: `held` stays
                return
        self.held = max(0, self.held - 1)
