"""The backend stand-in, broken: every /health request fails with a traceback on stderr."""

from __future__ import annotations

import sys
import traceback

import app
import standin
from standin import METRICS, env_port, serve

_dispatch = app.Backend.dispatch


def open_database() -> None:
    raise ConnectionRefusedError("maicivy-broken: could not connect to the database "
                                 "(postgres:5432): connection refused")


def dispatch(self, method, path, query, body):
    if path == "/health":
        try:
            open_database()
        except ConnectionRefusedError:
            traceback.print_exc()
            sys.stderr.flush()
    return _dispatch(self, method, path, query, body)


def handle_error(self, request, client_address):
    """Quiet about clients that hang up (wget --spider on a 500): keep the logs to the
    application's own traceback."""
    if isinstance(sys.exc_info()[1], ConnectionError):
        return
    _handle_error(self, request, client_address)


app.Backend.dispatch = dispatch
_handle_error = standin.Server.handle_error
standin.Server.handle_error = handle_error

if __name__ == "__main__":
    METRICS.counter("maicivy_visitors_total", app.VISITORS_HELP, by=0)
    serve(app.Backend, env_port(8080, "PORT"), f"backend {app.VERSION}")
