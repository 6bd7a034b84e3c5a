"""One background asyncio loop for the whole process, so that asyncio libraries
(qemu.qmp) can be called from plain code and from notebook cells, where
Jupyter's own loop is already running and ``asyncio.run`` is refused.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

__all__ = ["run_sync"]

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="labkit-asyncio", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on labkit's loop thread and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise
