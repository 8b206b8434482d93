"""Sequences and ensembles through `--workers 2`: the sequence parameters and every request of a
sequence reach the engine's sequence batcher, and ensemble steps run in the engine, whichever
front-end process took the call."""

from __future__ import annotations

import pytest
from e2e.test_ensembles import (  # noqa: F401  (fixtures rebound to ens_server below)
    build_ensemble_repository,
    grpc,
    http,
    protocol,
    test_chain_runs_each_step_in_order,
    test_fan_out_fan_in,
    test_step_error_ends_the_request_and_names_the_step,
)
from e2e.test_sequences import (  # noqa: F401
    build_sequence_repository,
    test_grpc_stream_sequences,
    test_interleaved_concurrent_sequences_keep_their_own_totals,
    test_missing_correlation_id_gets_tritons_error,
    test_sequence_output_is_the_running_total,
)
from helpers import ConvoyProcess, serve_until_stopped
from worker_metrics import WORKERS


@pytest.fixture(scope="module")
def ens_server(tmp_path_factory):
    """One server behind two workers holding both suites' models."""
    root = tmp_path_factory.mktemp("workers-pipelines")
    build_sequence_repository(root / "models")
    build_ensemble_repository(root / "models")
    process = ConvoyProcess(root / "models", root / "server.log", WORKERS)
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module")
def seq_server(ens_server):
    return ens_server
