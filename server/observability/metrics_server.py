"""The /metrics endpoint's own HTTP server: prometheus_client's WSGI app on a thread, optionally
behind TLS and an API key.

prometheus_client's `start_http_server` can do TLS but has no hook for checking a bearer key, so
this serves the same WSGI app (`make_wsgi_app`) with both. Scrapes never touch the event loop.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import ssl
import threading
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted

from convoy.auth import Keyring
from convoy.engine.exposition import prometheus_text
from convoy.errors import ConvoyError, status_of

log = logging.getLogger("convoy.metrics")

_REASONS = {401: "Unauthorized", 403: "Forbidden"}


class _Handler(WSGIRequestHandler):
    #: Seconds a scrape connection may stall, TLS handshake included (one thread per connection).
    timeout = 10

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # Handshake here, on the connection's thread, not in the accepting one.
            self.connection.do_handshake()

    def log_message(self, format, *args) -> None:  # scrapes are not logged
        pass


class _Server(ThreadingWSGIServer):
    def handle_error(self, request, client_address) -> None:
        # Refused handshakes and dropped scrapes are the client's problem, not a traceback.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def require_key(app, keys: Keyring):
    """WSGI wrapper: 401 with `WWW-Authenticate: Bearer` unless the request carries a valid key."""

    def guarded(environ, start_response):
        try:
            keys.authenticate(environ.get("HTTP_AUTHORIZATION"))
        except ConvoyError as exc:
            _, status, message = status_of(exc)
            body = json.dumps({"error": message}).encode()
            start_response(
                f"{status} {_REASONS.get(status, 'Error')}",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", "Bearer"),
                ],
            )
            return [body]
        return app(environ, start_response)

    return guarded


def metrics_app(registry: CollectorRegistry):
    """prometheus_client's WSGI app, except that a scrape in the Prometheus text format (what
    Triton serves, and what a plain `curl` gets) is written by `prometheus_text`, so counters
    model code defines are typed `counter` under their exact names as on Triton."""
    app = make_wsgi_app(registry)

    def serve(environ, start_response):
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        if (
            encoder is not generate_latest
            or environ["REQUEST_METHOD"] != "GET"
            or environ.get("PATH_INFO") == "/favicon.ico"
            or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))
        ):
            return app(environ, start_response)
        output = prometheus_text(registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return serve


def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    tls: ssl.SSLContext | None = None,
    keys: Keyring | None = None,
) -> tuple[_Server, threading.Thread]:
    """Serve `registry` on host:port (0 = any free) on a daemon thread; the caller shuts it down.
    `keys`: every scrape needs a valid key."""
    app = metrics_app(registry)
    if keys is not None:
        app = require_key(app, keys)

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, app, Server, handler_class=_Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="convoy-metrics", daemon=True)
    thread.start()
    return httpd, thread
