"""A TCP relay to a real server that can stop relaying: a database that stops answering (a network
partition, a failover) without closing anything, as a client on the far side of it sees it; or a
connection that breaks after the server got a request and before its answer came back."""

from __future__ import annotations

import asyncio
import threading

from tests.conftest import wait_until


class FreezableLink:
    """Relays 127.0.0.1:`port` to `target`; `freeze()` holds every byte (both ways, new connections
    too) until `thaw()`; `cut_answer_to(marker)` breaks the connection of the next request containing
    `marker` once the server answers it, the answer not relayed (`cuts` counts them)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: bytes flow
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._cut_marker: bytes | None = None
        self.cuts = 0

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

    def cut_answer_to(self, marker: bytes) -> None:
        """Once: relay the next request (a read from a client) that contains `marker`, then close that
        connection both ways when the server's answer comes, instead of relaying it: the server did
        what it was asked, the client never hears (as when a connection breaks at that moment)."""
        self._loop.call_soon_threadsafe(setattr, self, "_cut_marker", marker)
        wait_until(lambda: self._cut_marker == marker, timeout=5)

    def stop(self) -> None:
        self.thaw()
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        # Ends the relays still running: left pending in a stopped loop, they were destroyed later
        # ("Task was destroyed but it is pending!"), logged into whichever test was running then.
        if self._server is not None:
            self._server.close()
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await asyncio.sleep(0)  # (the closed transports' connection_lost callbacks run)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        marked = asyncio.Event()  # this connection carried the request whose answer is cut
        await asyncio.gather(
            self._pipe(reader, up_writer, mark=marked), self._pipe(up_reader, writer, cut=marked, peer=up_writer)
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mark: asyncio.Event | None = None,  # (client to server) set it on the marked request
        cut: asyncio.Event | None = None,  # (server to client) once set, the next bytes break the connection
        peer: asyncio.StreamWriter | None = None,  # (server to client) the server's side, closed with it
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()  # frozen: held, not lost
                if cut is not None and cut.is_set():
                    self.cuts += 1
                    if peer is not None:
                        peer.close()
                    return
                if mark is not None and self._cut_marker is not None and self._cut_marker in data:
                    self._cut_marker = None
                    mark.set()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
