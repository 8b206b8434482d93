"""The native data plane's Python side: the native front end (convoy.server._native, built from
server/native) owns both listening sockets; this package feeds what it takes to the engine and
hands the answers back.

- `frontend.py`: the lifetime (start, model table, shutdown) and the loop's reader.
- `calls.py`: inference requests the native side parsed and checked, as engine Requests.
- `forward.py`: everything else, answered by the Python front end's own handlers (the ASGI app
  for HTTP, the gRPC servicer behind its interceptors), so nothing exists on one front end only.
"""
