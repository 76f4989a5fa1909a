"""grpc.health.v1 for a server that drains: Watch streams end when shutdown begins.

gRPC's reference servicer keeps every Watch stream open until the client leaves, so a
client that watches health (client-side health checking) would hold a graceful stop for
its whole grace period. Here shutdown sends NOT_SERVING to every watcher, then ends the
streams, and only calls that do real work are waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

# Long enough for the watchers to be sent NOT_SERVING before their streams end.
FINAL_STATUS_DELIVERY_S = 0.05


class DrainingHealthServicer(HealthServicer):  # type: ignore[misc]  # untyped upstream class
    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task[None]] = set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802
        task = asyncio.ensure_future(super().Watch(request, context))
        self._watches.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._watches.discard(task)

    async def drain(self) -> None:
        """Everything NOT_SERVING for good, watchers told, their streams ended."""
        await self.enter_graceful_shutdown()
        await asyncio.sleep(FINAL_STATUS_DELIVERY_S)
        for task in list(self._watches):
            task.cancel()
