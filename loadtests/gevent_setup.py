"""Import this before anything else in the load generator: locust monkey-patches the standard
library for gevent when imported, and gRPC must be told to cooperate with gevent before its
first channel. The `convoy` CLI imports it only when `loadtest` or `capacity` runs."""

import locust  # noqa: F401  (monkey-patches on import)
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()
