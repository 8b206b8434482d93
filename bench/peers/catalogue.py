"""Which peers exist, what each needs installed, and where its virtualenv lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"
INSTALL_COMMAND = "python -m bench.peers install"


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    #: The distribution whose installed version the report names.
    distribution: str
    #: pip requirement specifiers, pinned where an unpinned install breaks on this machine.
    requirements: tuple[str, ...]
    #: Imported by the installer's check (and by `installed`'s marker) once pip is done.
    module: str
    #: Whether perf_analyzer can drive it (needs the ModelConfig RPC/route and the statistics API).
    perf_analyzer: bool

    def venv(self, base: Path = PEERS_DIR) -> Path:
        return base / self.name

    def python(self, base: Path = PEERS_DIR) -> Path:
        return self.venv(base) / "bin" / "python"


PEERS: dict[str, Peer] = {
    "pytriton": Peer(
        name="pytriton",
        description="NVIDIA Triton Inference Server through PyTriton 0.7 (python backend)",
        distribution="nvidia-pytriton",
        # PyTriton's bundled stubs are built against numpy 1.
        requirements=("nvidia-pytriton>=0.7,<0.8", "numpy<2"),
        module="pytriton",
        perf_analyzer=True,
    ),
    "mlserver": Peer(
        name="mlserver",
        description="Seldon MLServer 1.7 (custom MLModel, adaptive batching)",
        distribution="mlserver",
        # mlserver pulls numpy 2 and pandas 3 that its codecs break on; its workers die at
        # start with uvloop 0.22+.
        requirements=("mlserver>=1.7,<1.8", "numpy<2", "pandas<3", "uvloop<0.22"),
        module="mlserver",
        perf_analyzer=False,
    ),
}

#: Written last by the installer, so a half-finished install does not count as installed.
MARKER = "convoy-peer-installed"


def installed(peer: Peer, base: Path = PEERS_DIR) -> bool:
    return (peer.venv(base) / MARKER).exists() and peer.python(base).exists()


def installed_versions(peer: Peer, base: Path = PEERS_DIR) -> dict[str, str]:
    """The peer's distribution and numpy versions as pinned in its virtualenv (from pip freeze)."""
    wanted = {peer.distribution, "numpy"}
    versions = {}
    for line in (peer.venv(base) / MARKER).read_text().splitlines():
        name, _, version = line.partition("==")
        if name.lower() in wanted:
            versions[name.lower()] = version
    return versions


def missing_reason(peer: Peer) -> str:
    return f"not installed (run `{INSTALL_COMMAND} {peer.name}`)"
