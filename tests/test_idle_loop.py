"""The event loop that says when it is idle: its callbacks run once the ready work and the ready
I/O are done, never before, never twice, without sleeping through a timer they set or spinning
afterwards; and `serve` runs on it by default."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Callable

from ratelimit import cli
from ratelimit.limiter import idle_loop
from ratelimit.limiter.idle_loop import IdleAwareEventLoop, IdleFlush
from ratelimit.settings import settings_from_environment


def run_idle_aware(main: Callable[[IdleAwareEventLoop], Any]) -> Any:
    """`main(loop)` on the idle-aware loop. A watchdog wakes the loop every second, so a loop that
    wrongly waits for I/O forever fails the test's timing instead of hanging the suite."""
    result: list[Any] = []
    done = threading.Event()

    async def keep() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, IdleAwareEventLoop)

        def watchdog() -> None:
            while not done.wait(1.0):
                loop.call_soon_threadsafe(lambda: None)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            result.append(await main(loop))
        finally:
            done.set()

    idle_loop.run(keep())
    return result[0]


def test_an_idle_callback_runs_after_the_ready_work_and_long_before_a_later_timer() -> None:
    order: list[str] = []

    async def main(loop: IdleAwareEventLoop) -> float:
        def work(left: int) -> None:
            order.append("work")
            if left:
                loop.call_soon(work, left - 1)  # a chain of loop turns, none of them idle

        idle: asyncio.Future[float] = loop.create_future()
        started = time.monotonic()
        loop.call_soon(work, 49)
        loop.call_later(0.5, order.append, "timer")
        loop.call_when_idle(lambda: (order.append("idle"), idle.set_result(time.monotonic())))
        idle_at = await idle
        await asyncio.sleep(0.6)  # the timer fires; the idle callback does not run again
        return idle_at - started

    took_s = run_idle_aware(main)
    assert order == ["work"] * 50 + ["idle", "timer"]
    assert took_s < 0.1  # at the first idle turn, not at the next timer


def test_io_that_is_ready_is_handled_before_the_loop_counts_as_idle() -> None:
    order: list[str] = []

    async def main(loop: IdleAwareEventLoop) -> None:
        left, right = socket.socketpair()
        try:
            left.setblocking(False)
            right.send(b"x")
            idle: asyncio.Future[None] = loop.create_future()
            loop.add_reader(left, lambda: (order.append("read"), left.recv(1), loop.remove_reader(left)))
            loop.call_when_idle(lambda: (order.append("idle"), idle.set_result(None)))
            await idle
        finally:
            left.close()
            right.close()

    run_idle_aware(main)
    assert order == ["read", "idle"]


def test_a_timer_set_by_an_idle_callback_fires_on_time_and_the_loop_then_sleeps() -> None:
    # With no other timer the loop would wait for I/O with no timeout: it must look again at its
    # timers after the idle callbacks ran, and must not spin once they have.
    async def main(loop: IdleAwareEventLoop) -> tuple[float, float]:
        fired: asyncio.Future[float] = loop.create_future()
        started = time.monotonic()
        loop.call_when_idle(lambda: loop.call_later(0.05, lambda: fired.set_result(time.monotonic())))
        fired_at = await fired
        cpu_before = time.thread_time()
        await asyncio.sleep(0.3)
        return fired_at - started, time.thread_time() - cpu_before

    fired_after_s, cpu_while_sleeping_s = run_idle_aware(main)
    assert 0.05 <= fired_after_s < 0.3
    assert cpu_while_sleeping_s < 0.05


def test_idle_flush_is_armed_once_on_a_busy_loop_and_can_be_armed_again_after_it_fired() -> None:
    flushes: list[float] = []

    async def main(loop: IdleAwareEventLoop) -> None:
        flush = IdleFlush(lambda: flushes.append(time.monotonic()))

        def busy_turn(left: int) -> None:
            flush.arm(loop)  # a thousand arms while the loop never idles: one callback
            if left:
                loop.call_soon(busy_turn, left - 1)

        loop.call_soon(busy_turn, 999)
        await asyncio.sleep(0.05)
        assert len(flushes) == 1
        flush.arm(loop)
        await asyncio.sleep(0.05)

    run_idle_aware(main)
    assert len(flushes) == 2


def test_idle_flush_does_nothing_on_a_loop_that_cannot_say_it_is_idle() -> None:
    flushes: list[int] = []

    async def main() -> None:
        IdleFlush(lambda: flushes.append(1)).arm(asyncio.get_running_loop())
        await asyncio.sleep(0.05)

    asyncio.run(main())  # asyncio's own loop: the window's end alone sends a held batch
    assert flushes == []


def test_serve_runs_on_the_idle_aware_loop_by_default() -> None:
    settings = settings_from_environment({})
    assert settings.event_loop == "asyncio"
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())

    cli._event_loop_runner(settings.event_loop)(main())
    assert isinstance(loops[0], IdleAwareEventLoop)
