"""The e2e suites that need only the session servers, run again through `--workers 2`: every
answer (results, errors and their statuses, metadata, statistics, repository control) must be
what a single process gives. conftest.py here rebinds `server`/`broken_server` to worker servers."""

from __future__ import annotations

from e2e.test_cancellation import (  # noqa: F401  (gate_server: this folder's, two workers)
    test_full_queue_rejects_with_resource_exhausted_and_429,
    test_grpc_deadline_removes_request_from_queue,
    test_http_client_disconnect_removes_request_from_queue,
)
from e2e.test_datatypes import *  # noqa: F403
from e2e.test_grpc_streaming import *  # noqa: F403
from e2e.test_health_and_metadata import *  # noqa: F403
from e2e.test_model_failures import *  # noqa: F403
from e2e.test_perf_analyzer import *  # noqa: F403
from e2e.test_raw_http import *  # noqa: F403
from e2e.test_repository import *  # noqa: F403
from e2e.test_request_errors import *  # noqa: F403
from e2e.test_shared_memory import *  # noqa: F403
from e2e.test_statistics import *  # noqa: F403
from e2e.test_versions import *  # noqa: F403

# These start their own single-process server: nothing about workers to learn from them here.
del small_body_server  # noqa: F821
del test_body_over_the_limit_returns_400  # noqa: F821
del test_compressed_body_inflating_past_the_limit_returns_400  # noqa: F821
del test_compressed_body_within_the_limit_is_served  # noqa: F821
