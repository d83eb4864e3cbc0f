"""Run a master: open the store (migrating it), serve the API with uvicorn."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from herder.master.app import MasterConfig, create_app
from herder.store import Store

log = logging.getLogger("herder.master")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.app
        app.state.stopping = True
        # Signal handlers run on the loop's thread under uvicorn; wake every
        # long-poll so in-flight claims answer and graceful shutdown is quick.
        app.state.notifier.notify()
        super().handle_exit(sig, frame)


def serve(
    db_url: str,
    host: str = "127.0.0.1",
    port: int = 6240,
    *,
    lease_s: float = 30.0,
    ack_timeout_s: float = 30.0,
    config: MasterConfig | None = None,
    access_log: bool = False,
) -> None:
    store = Store.open(db_url, migrate=True, lease_s=lease_s, ack_timeout_s=ack_timeout_s)
    app = create_app(store, config)
    try:
        server = _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                access_log=access_log,
                log_config=None,
                timeout_keep_alive=75,
                timeout_graceful_shutdown=10,
                # A long-polling agent is one coroutine, not a thread: thousands fit.
                limit_concurrency=None,
                backlog=4096,
            ),
            app,
        )
        server.run()
    finally:
        store.close()
