"""One worker process of the decision service: an event loop (uvloop) serving the
shared listening socket, its admits and store thread, the sweep of overstaying
connections and the engine's tick, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
import socket

from policer.serve.admits import Admits
from policer.serve.http_server import DEFAULT_LIMITS, HttpServer, Limits
from policer.serve.service import Service
from policer.serve.store_thread import StoreThread
from policer.serve.ticker import Ticker

__all__ = ["serve_forever"]


def serve_forever(service: Service, sock: socket.socket, limits: Limits = DEFAULT_LIMITS) -> None:
    """Serve ``sock`` until SIGTERM/SIGINT."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    store = StoreThread(service, loop)
    admits = Admits(service, loop, store)
    server = HttpServer(service, admits, store, limits)
    ticker = Ticker(service.engine)
    stop = asyncio.Event()

    def sweep() -> None:
        server.sweep()
        loop.call_later(limits.sweep_s, sweep)

    async def main() -> None:
        listening = await loop.create_server(server.protocol, sock=sock, backlog=1024)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(limits.sweep_s, sweep)
        admits.start()
        ticker.start()
        try:
            await stop.wait()
        finally:
            listening.close()
            admits.close()
            store.close()
            server.close()
            ticker.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
