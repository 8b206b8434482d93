"""Hostile clients (issue 21), each bounded in time and size, run against a real server on
loopback. The tests in test_hostile_input.py assert on what they return; run this file to print
the figures (RSS from /proc, the longest stall another client saw) for a server it starts:

    .venv/bin/python tests/security/hostile.py [attack ...]
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int, timeout: float = 5.0) -> int:
    """RSS once it stops falling (the allocator hands memory back over a few moments)."""
    last = [rss_bytes(pid)]

    def steady():
        now = rss_bytes(pid)
        done = now >= last[0] - (1 << 20)
        last[0] = now
        return done

    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pause.wait(0.2)
        if steady():
            break
    return last[0]


#: Another client, in its own process (the attacking client's work must not count): it asks
#: /v2/health/live in a loop until its standard input closes, then prints what it saw.
_PROBE = """
import json, sys, threading, time, requests
url, stop, result = sys.argv[1], threading.Event(), {"longest": 0.0, "answered": 0, "failed": 0}
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
session = requests.Session()
while not stop.is_set():
    started = time.monotonic()
    try:
        ok = session.get(url, timeout=60).status_code == 200
    except requests.RequestException:
        ok, session = False, requests.Session()
    result["longest"] = max(result["longest"], time.monotonic() - started)
    result["answered" if ok else "failed"] += 1
    if result["answered"] == 1 and ok:
        print("first", flush=True)
    stop.wait(0.01)
print(json.dumps(result), flush=True)
"""


@dataclass
class Probe:
    """What the probing client saw: the longest it waited for an answer is the stall."""

    longest: float = 0.0
    answered: int = 0
    failed: int = 0


@contextmanager
def probing(base_url: str):
    process = subprocess.Popen(
        [sys.executable, "-c", _PROBE, f"{base_url}/v2/health/live"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    probe = Probe()
    try:
        assert process.stdout.readline().strip() == "first", "the probe got no first answer"
        yield probe
    finally:
        process.stdin.close()
        found = json.loads(process.stdout.readline() or "{}")
        process.wait(timeout=70)
        probe.longest = found.get("longest", 0.0)
        probe.answered = found.get("answered", 0)
        probe.failed = found.get("failed", 0)


@dataclass
class Outcome:
    statuses: list
    rss_before: int
    rss_peak: int
    rss_after: int
    stall_s: float
    #: Probe requests that failed while the attack ran (another client not served).
    probe_failed: int = 0

    def line(self, name: str) -> str:
        mib = 1 << 20
        return (
            f"{name:24s} statuses={sorted(set(map(str, self.statuses)))} "
            f"rss {self.rss_before / mib:.0f} -> peak {self.rss_peak / mib:.0f} -> after "
            f"{self.rss_after / mib:.0f} MiB, longest stall {self.stall_s * 1000:.0f} ms, "
            f"probe failures {self.probe_failed}"
        )


@contextmanager
def measured(pid: int, base_url: str, statuses: list):
    before = settled_rss(pid)
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = {}
    with probing(base_url) as probe:
        yield result
    stop.set()
    sampler.join()
    result["outcome"] = Outcome(statuses, before, peak[0], settled_rss(pid), probe.longest, probe.failed)


# --- the attacks -----------------------------------------------------------------------------


def json_bomb_body(inflated_bytes: int) -> bytes:
    """A gzip body whose JSON asks add_sub for [1, 16] FP32 with `inflated_bytes` of `0.0,`."""
    head = b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":['
    tail = (
        b'0.0]},{"name":"INPUT1","datatype":"FP32","shape":[1,16],"data":[' + b"0.0," * 15 + b"0.0]}]}"
    )
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [deflater.compress(head)]
    chunk = b"0.0," * (1 << 18)
    for _ in range(inflated_bytes // len(chunk)):
        parts.append(deflater.compress(chunk))
    parts.append(deflater.compress(tail))
    parts.append(deflater.flush())
    return b"".join(parts)


def json_bomb(pid: int, base_url: str, inflated_bytes: int = 200 << 20, count: int = 1) -> Outcome:
    body = json_bomb_body(inflated_bytes)
    statuses: list = []
    with measured(pid, base_url, statuses) as result:
        for _ in range(count):
            answer = requests.post(
                f"{base_url}/v2/models/add_sub/infer",
                data=body,
                headers={"content-encoding": "gzip", "content-type": "application/json"},
                timeout=120,
            )
            statuses.append(answer.status_code)
    return result["outcome"]


def large_grpc_messages(pid: int, base_url: str, grpc_url: str, size: int = 200 << 20, count: int = 3):
    """`count` ModelInfer messages of `size` raw bytes for a [1, 16] input: INVALID_ARGUMENT."""
    import grpc

    from convoy.protos import grpc_service_pb2 as pb
    from convoy.protos import grpc_service_pb2_grpc as pb_grpc

    statuses: list = []
    channel = grpc.insecure_channel(
        grpc_url, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    payload = b"\0" * size
    message = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        message.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    message.raw_input_contents.append(payload)
    message.raw_input_contents.append(b"\0" * 64)
    with measured(pid, base_url, statuses) as result:
        for _ in range(count):
            try:
                stub.ModelInfer(message, timeout=120)
                statuses.append("OK")
            except grpc.RpcError as exc:
                statuses.append(exc.code().name)
    channel.close()
    return result["outcome"]


def unload_unknown_names(
    pid: int, base_url: str, grpc_url: str, count: int = 300, length: int = 256 << 10
):
    import grpc

    from convoy.protos import grpc_service_pb2 as pb
    from convoy.protos import grpc_service_pb2_grpc as pb_grpc

    statuses: list = []
    channel = grpc.insecure_channel(grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with measured(pid, base_url, statuses) as result:
        for index in range(count):
            name = f"{index:08d}" + "x" * (length - 8)
            try:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
                statuses.append("OK")
            except grpc.RpcError as exc:
                statuses.append(exc.code().name)
    channel.close()
    return result["outcome"]


def raw_http(host: str, port: int, head: bytes, timeout: float = 30.0) -> bytes:
    """Send `head` on a fresh connection; what the server answered (b"" if it only closed)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        answer = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
                if b"\r\n\r\n" in answer:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def huge_header(pid: int, base_url: str, http_port: int, size: int = 64 << 20) -> Outcome:
    statuses: list = []
    head = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * size + b"\r\n\r\n"
    with measured(pid, base_url, statuses) as result:
        answer = raw_http("127.0.0.1", http_port, head)
        statuses.append(answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed")
    return result["outcome"]


def many_headers(pid: int, base_url: str, http_port: int, count: int = 10_000) -> Outcome:
    statuses: list = []
    lines = b"".join(b"x-h%d: v\r\n" % i for i in range(count))
    head = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n" + lines + b"\r\n"
    with measured(pid, base_url, statuses) as result:
        answer = raw_http("127.0.0.1", http_port, head)
        statuses.append(answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed")
    return result["outcome"]


def version_and_name_statuses(base_url: str) -> dict[str, int]:
    """HTTP status for each bad version/name request (metadata, config, stats, load)."""
    out = {}
    for label, version in (("unicode digit", "²"), ("5000 digits", "9" * 5000)):
        for action in ("", "/config", "/stats"):
            url = f"{base_url}/v2/models/add_sub/versions/{version}{action}"
            out[f"version {label} {action or '/'}"] = requests.get(url, timeout=30).status_code
    out["load 10000-char name"] = requests.post(
        f"{base_url}/v2/repository/models/{'a' * 10_000}/load", timeout=30
    ).status_code
    out["load name with newline"] = requests.post(
        f"{base_url}/v2/repository/models/add_sub%0A/load", timeout=30
    ).status_code
    return out


def unread_stream(
    pid: int, base_url: str, grpc_url: str, count: int = 60_000, rows: int = 64
) -> Outcome:
    """`count` add_sub requests of `rows` rows (8 KiB each at 64) on one ModelStreamInfer whose
    answers are never read."""
    import grpc

    from convoy.protos import grpc_service_pb2 as pb
    from convoy.protos import grpc_service_pb2_grpc as pb_grpc

    statuses: list = []
    message = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        message.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        message.raw_input_contents.append(b"\0" * 64 * rows)
    channel = grpc.insecure_channel(grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    sent = [0]
    done = threading.Event()

    def requests_iter():
        for _ in range(count):
            sent[0] += 1
            yield message
        done.wait(60)

    with measured(pid, base_url, statuses) as result:
        call = stub.ModelStreamInfer(requests_iter(), timeout=120)
        # Never read the answers; let the client push what the server lets it.
        deadline = time.monotonic() + 20
        last, still = -1, 0
        while time.monotonic() < deadline and sent[0] < count:
            time.sleep(0.5)
            still = still + 1 if sent[0] == last else 0
            last = sent[0]
            if still >= 4:  # the server stopped reading: backpressure reached the client
                break
        result_peak = rss_bytes(pid)
        statuses.append(f"sent {sent[0]}")
        statuses.append(f"rss while held {result_peak >> 20} MiB")
        done.set()
        call.cancel()
    channel.close()
    return result["outcome"]


def idle_connections(pid: int, base_url: str, http_port: int, count: int) -> tuple[Outcome, list]:
    """`count` connections that never send a byte (held open), and a new client polling
    /v2/health/live: what it got first, and how long until it was served."""
    sockets = []
    statuses: list = []
    with measured(pid, base_url, statuses) as result:
        for _ in range(count):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", http_port), timeout=5))
            except OSError as exc:
                statuses.append(type(exc).__name__)
                break
        started = time.monotonic()
        first = None
        while time.monotonic() - started < 60:
            try:
                code = requests.get(f"{base_url}/v2/health/live", timeout=10).status_code
            except requests.RequestException as exc:
                code = type(exc).__name__
            if first is None:
                first = f"first answer {code} after {time.monotonic() - started:.2f}s"
            if code == 200:
                break
            time.sleep(0.1)
        statuses.append(first)
        statuses.append(f"served (200) after {time.monotonic() - started:.2f}s")
    return result["outcome"], sockets


def text_embedding_long(pid: int, base_url: str, size: int = 10 << 20) -> Outcome:
    statuses: list = []
    document = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["word " * (size // 5)]}
        ]
    }
    body = json.dumps(document).encode()
    with measured(pid, base_url, statuses) as result:
        started = time.monotonic()
        answer = requests.post(f"{base_url}/v2/models/text_embedding/infer", data=body, timeout=120)
        statuses.append(answer.status_code)
        statuses.append(f"{time.monotonic() - started:.2f}s")
    return result["outcome"]


def main(argv: list[str]) -> None:
    import tempfile

    from helpers import ConvoyProcess

    from convoy.cli import demo_repository

    # As the default cap would be under the common open-file limit of 1024 (set below).
    extra = ["--max-connections=384", "--model-control-mode=explicit", "--load-model=*"]
    extra += [arg for arg in argv if arg.startswith("--")]
    wanted = {arg for arg in argv if not arg.startswith("--")}
    with tempfile.TemporaryDirectory() as root:
        repository = Path(root) / "models"
        repository.mkdir()
        for name in ("add_sub", "text_embedding") if "embed" in wanted or not wanted else ("add_sub",):
            shutil.copytree(demo_repository() / name, repository / name)
        process = ConvoyProcess(repository, Path(root) / "server.log", tuple(extra))
        process.start()
        pid, base = process.pid, process.base_url
        try:
            if not wanted or "json" in wanted:
                print(json_bomb(pid, base).line("json bomb 200 MiB"), flush=True)
            if not wanted or "grpc" in wanted:
                print(
                    large_grpc_messages(pid, base, process.grpc_url).line("3 x 200 MiB gRPC"), flush=True
                )
            if not wanted or "unload" in wanted:
                print(
                    unload_unknown_names(pid, base, process.grpc_url).line("unload 300 names"),
                    flush=True,
                )
            if not wanted or "header" in wanted:
                print(huge_header(pid, base, process.http_port).line("64 MiB header"), flush=True)
                print(many_headers(pid, base, process.http_port).line("10k headers"), flush=True)
            if not wanted or "status" in wanted:
                print(version_and_name_statuses(base), flush=True)
            if not wanted or "stream" in wanted:
                print(unread_stream(pid, base, process.grpc_url).line("unread stream"), flush=True)
            if not wanted or "idle" in wanted:
                import resource

                resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, 1024))
                outcome, held = idle_connections(pid, base, process.http_port, 1500)
                print(outcome.line("1500 idle connections"), flush=True)
                for sock in held:
                    sock.close()
            if not wanted or "embed" in wanted:
                print(text_embedding_long(pid, base).line("text_embedding 10 MiB"), flush=True)
        finally:
            process.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
