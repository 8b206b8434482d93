"""`python -m bench.peers install [NAME ...]`: one virtualenv per peer under .peers/.

`python -m bench.peers list` says which are installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .catalogue import MARKER, PEERS, PEERS_DIR, Peer, installed, missing_reason


def install(peer: Peer, base: Path, python: str) -> None:
    target = peer.venv(base)
    print(f"{peer.name}: creating {target}", flush=True)
    # A venv of the given interpreter (default: the one running this), with its own pip.
    subprocess.run([python, "-m", "venv", "--clear", str(target)], check=True)
    pip = [str(peer.python(base)), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *peer.requirements], check=True)
    subprocess.run([str(peer.python(base)), "-c", f"import {peer.module}"], check=True)
    frozen = subprocess.run(
        [str(peer.python(base)), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
    ).stdout
    (target / MARKER).write_text(frozen)
    print(f"{peer.name}: installed ({', '.join(peer.requirements)})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("action", choices=["install", "list"])
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(PEERS)} (default: all)")
    parser.add_argument("--dir", type=Path, default=PEERS_DIR, help="where the virtualenvs go")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the virtualenvs")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in PEERS]
    if unknown:
        parser.error(f"unknown peer {', '.join(unknown)}; expected some of {', '.join(PEERS)}")
    peers = [PEERS[name] for name in args.names or PEERS]
    if args.action == "list":
        for peer in peers:
            state = "installed" if installed(peer, args.dir) else missing_reason(peer)
            print(f"{peer.name}: {state}")
        return 0
    for peer in peers:
        install(peer, args.dir, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
