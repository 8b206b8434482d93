"""What a large tensor costs to cross a process boundary: received over a Unix socket pair vs
copied once into shared memory (the choice behind engine/arena.py).

    python bench/ipc_copy.py                 # 600 KB (a 3x224x224 FP32 image), 2,000 times
    python bench/ipc_copy.py --kib 64 --count 20000

Prints the receiving thread's CPU µs per tensor (time.thread_time around recv_into while another
thread sends) and the CPU µs of one numpy copy into an mmap of the same size.
"""

from __future__ import annotations

import argparse
import mmap
import socket
import threading
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kib", type=int, default=588, help="tensor size in KiB (default 588: 3x224x224 FP32)"
    )
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    size = args.kib * 1024
    payload = np.random.default_rng(0).random(size // 4).astype(np.float32)
    sender, receiver = socket.socketpair()
    for sock, option in ((sender, socket.SO_SNDBUF), (receiver, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)

    def send() -> None:
        for _ in range(args.count):
            sender.sendall(payload.data)

    thread = threading.Thread(target=send)
    thread.start()
    view = memoryview(bytearray(size))
    cpu = time.thread_time()
    for _ in range(args.count):
        received = 0
        while received < size:
            received += receiver.recv_into(view[received:])
    socket_us = (time.thread_time() - cpu) / args.count * 1e6
    thread.join()
    shared = mmap.mmap(-1, size)
    target = np.frombuffer(shared, np.float32)
    cpu = time.thread_time()
    for _ in range(args.count):
        np.copyto(target, payload)
    copy_us = (time.thread_time() - cpu) / args.count * 1e6
    print(
        f"{args.kib} KiB: socket receive {socket_us:.1f} µs CPU, "
        f"one copy into shared memory {copy_us:.1f} µs CPU"
    )


if __name__ == "__main__":
    main()
