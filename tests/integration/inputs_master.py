"""A real master process with small body bounds, for test_api_inputs.py.

``python inputs_master.py DB_URL PORT MAX_BODY MAX_BLOB``: the master of
``herder master`` (same store, app and uvicorn), with bounds small enough to
pass cheaply and one extra route, ``GET /test/boom``, whose bug is answered
by the master's own unhandled-exception handler (a 500 to count).
"""

from __future__ import annotations

import sys

import uvicorn

from herder.logsetup import setup_logging
from herder.master.app import MasterConfig, create_app
from herder.store import Store


def main() -> None:
    db_url, port, max_body, max_blob = sys.argv[1:5]
    setup_logging("info")
    store = Store.open(db_url, migrate=True)
    cfg = MasterConfig(
        max_body_bytes=int(max_body),
        max_blob_bytes=int(max_blob),
        max_tasks_per_job=50,
        url=f"http://127.0.0.1:{port}",
    )
    app = create_app(store, cfg)

    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError("a bug on purpose")

    try:
        uvicorn.run(app, host="127.0.0.1", port=int(port), log_config=None, access_log=False)
    finally:
        store.close()


if __name__ == "__main__":
    main()
