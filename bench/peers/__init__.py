"""Convoy's peers for the benchmark: NVIDIA Triton (through PyTriton) and Seldon MLServer.

Each peer lives in its own virtualenv under `.peers/<name>` (gitignored), installed by
`python -m bench.peers install`, and serves the same numpy MLP as Convoy's `mlp` workload.
"""

from .catalogue import PEERS, Peer, installed, missing_reason

__all__ = ["PEERS", "Peer", "installed", "missing_reason"]
