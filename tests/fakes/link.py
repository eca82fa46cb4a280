"""A TCP relay to a real server that can stop relaying: a database that stops answering (a network
partition, a failover) without closing anything, as a client on the far side of it sees it."""

from __future__ import annotations

import asyncio
import threading

from tests.conftest import wait_until


class FreezableLink:
    """Relays 127.0.0.1:`port` to `target`; `freeze()` holds every byte (both ways, new connections
    too) until `thaw()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: bytes flow
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FreezableLink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        wait_until(lambda: self.port, timeout=10)
        return self

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)
        wait_until(lambda: not self._open.is_set(), timeout=5)

    def thaw(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def stop(self) -> None:
        self.thaw()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _serve(self) -> None:
        self._open.set()
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()  # frozen: held, not lost
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
