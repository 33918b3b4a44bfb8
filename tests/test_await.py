"""``await`` on minidist Futures, as on ``asyncio.wrap_future``'s."""

from __future__ import annotations

import asyncio

import pytest

from minidist import Client
from gates import wait_for_file


def inc(x):
    return x + 1


def boom(x):
    raise ZeroDivisionError(f"boom {x}")


def test_await_a_future(session):
    async def main():
        return await session.submit(inc, 1)

    assert asyncio.run(main()) == 2


def test_await_a_large_result_fetched_off_the_loop(session):
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        value = await session.submit(bytes, 20_000_000, pure=False)
        ticker.cancel()
        return value, ticks

    value, ticks = asyncio.run(main())
    assert value == bytes(20_000_000)
    assert ticks > 0


def test_gather_of_futures_and_their_errors(session):
    async def main():
        return await asyncio.gather(*session.map(inc, range(10)) if isinstance(session, Client)
                                    else [session.submit(inc, i) for i in range(10)])

    assert asyncio.run(main()) == list(range(1, 11))

    async def failing():
        return await session.submit(boom, 1)

    with pytest.raises(ZeroDivisionError, match="boom 1"):
        asyncio.run(failing())


def test_wait_for_times_out_and_cancels_the_future(session, tmp_path):
    flag = str(tmp_path / "flag")
    future = session.submit(wait_for_file, 1, flag, pure=False)

    async def main():
        await asyncio.wait_for(future, 0.2)

    try:
        with pytest.raises(TimeoutError):
            asyncio.run(main())
        assert future.cancelled()  # as with asyncio.wrap_future: the source is cancelled
    finally:
        open(flag, "w").close()
    assert session.submit(inc, 5, pure=False).result(timeout=20) == 6


def test_a_cancelled_future_raises_cancelled_error(session, tmp_path):
    flag = str(tmp_path / "flag")
    future = session.submit(wait_for_file, 1, flag, pure=False)
    future.cancel()

    async def main():
        await future

    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())
    finally:
        open(flag, "w").close()
