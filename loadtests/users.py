"""Locust users, one per protocol: HTTP JSON, HTTP binary tensors, gRPC unary, gRPC streaming.

Each user is a closed loop: make a fresh random payload, send it with a unique id, time the
call, check the answer belongs to the request, and fire one locust `request` event
(request_type = protocol, name = model; a failure carries a `LoadTestFailure`).

Importing this module imports locust, which monkey-patches the process for gevent, and makes
gRPC cooperate with gevent. HTTP goes through tritonclient.http (gevent-native); gRPC
through grpc_client.py on tritonclient's stubs (never convoy.protos or convoy.server): the load
generator needs nothing from the server it measures.
"""

from __future__ import annotations

from . import gevent_setup  # noqa: F401  (first: monkey-patches this process)

# isort: split
import itertools
import time
from dataclasses import dataclass
from typing import ClassVar

import locust
import numpy as np
import tritonclient.http as httpclient
from locust import User, constant, task
from tritonclient.utils import InferenceServerException

from .checks import InferResponse, Oracle, check_response
from .errors import LoadTestFailure, RequestFailed, from_client_error
from .grpc_client import GrpcInferClient
from .payloads import ModelSpec, PayloadGenerator, PayloadOptions

__all__ = ["PROTOCOLS", "RequestBudget", "Target", "user_classes"]


@dataclass(frozen=True)
class Target:
    """The server, the model and the payloads every user of a run shares."""

    model: ModelSpec
    http_url: str
    grpc_url: str
    payload: PayloadOptions
    oracle: Oracle | None
    timeout_s: float = 10.0
    seed: int | None = None


class RequestBudget:
    """At most `limit` requests across all users of a run (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        # Greenlets switch only on I/O, so this check-and-increment is atomic.
        if self.limit is not None and self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


def host_port(url: str) -> str:
    """tritonclient wants host:port: drop a scheme and a trailing slash."""
    return url.split("://", 1)[-1].rstrip("/")


class InferenceUser(User):
    """One closed-loop client of one protocol; subclasses implement connect/send/close."""

    abstract = True
    wait_time = constant(0)
    protocol: ClassVar[str] = ""
    target: ClassVar[Target]
    budget: ClassVar[RequestBudget]
    _ids: ClassVar[itertools.count] = itertools.count()

    def on_start(self) -> None:
        self.user_id = next(InferenceUser._ids)
        seed = None if self.target.seed is None else self.target.seed + self.user_id
        self.payloads = PayloadGenerator(self.target.model, self.target.payload, seed)
        self.sequence = 0
        self.connect()

    def on_stop(self) -> None:
        self.close()

    @task
    def infer(self) -> None:
        if not self.budget.take():
            raise locust.exception.StopUser()
        self.sequence += 1
        request_id = f"{self.protocol}-{self.user_id}-{self.sequence}"
        inputs = self.payloads.next()
        model = self.target.model
        failure: LoadTestFailure | None = None
        started = time.perf_counter()
        try:
            response = self.send(request_id, inputs)
            elapsed_ms = (time.perf_counter() - started) * 1000
            check_response(model, request_id, inputs, response, self.target.oracle)
        except LoadTestFailure as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            failure = exc
        except InferenceServerException as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            failure = from_client_error(exc.status(), exc.message())
        except Exception as exc:  # a broken connection, a timeout, a malformed answer
            elapsed_ms = (time.perf_counter() - started) * 1000
            failure = RequestFailed(f"{type(exc).__name__}: {exc}")
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=model.name,
            response_time=elapsed_ms,
            response_length=0,
            exception=failure,
            context={"id": request_id},
        )

    def connect(self) -> None:
        raise NotImplementedError

    def send(self, request_id: str, inputs: dict[str, np.ndarray]) -> InferResponse:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _HttpUser(InferenceUser):
    abstract = True
    binary: ClassVar[bool]

    def connect(self) -> None:
        self.client = httpclient.InferenceServerClient(
            host_port(self.target.http_url),
            connection_timeout=self.target.timeout_s,
            network_timeout=self.target.timeout_s,
        )

    def close(self) -> None:
        self.client.close()

    def send(self, request_id: str, inputs: dict[str, np.ndarray]) -> InferResponse:
        model = self.target.model
        tensors = []
        for spec in model.inputs:
            tensor = httpclient.InferInput(spec.name, list(inputs[spec.name].shape), spec.datatype)
            tensor.set_data_from_numpy(inputs[spec.name], binary_data=self.binary)
            tensors.append(tensor)
        outputs = [
            httpclient.InferRequestedOutput(t.name, binary_data=self.binary) for t in model.outputs
        ]
        result = self.client.infer(
            model.name, tensors, model_version=model.version, outputs=outputs, request_id=request_id
        )
        answer = result.get_response()
        return InferResponse(
            id=str(answer.get("id", "")),
            model_name=str(answer.get("model_name", "")),
            outputs={o["name"]: (o["datatype"], result.as_numpy(o["name"])) for o in answer["outputs"]},
        )


class HttpJsonUser(_HttpUser):
    """Tensors as JSON arrays in the request and the response body."""

    protocol = "http-json"
    binary = False


class HttpBinaryUser(_HttpUser):
    """Tensors in the binary tensor extension (raw bytes after the JSON header), both ways."""

    protocol = "http-binary"
    binary = True


class _GrpcUser(InferenceUser):
    abstract = True

    def connect(self) -> None:
        self.client = GrpcInferClient(host_port(self.target.grpc_url), self.target.timeout_s)

    def close(self) -> None:
        self.client.close()


class GrpcUser(_GrpcUser):
    """Unary ModelInfer calls on the user's own channel."""

    protocol = "grpc"

    def send(self, request_id: str, inputs: dict[str, np.ndarray]) -> InferResponse:
        return self.client.infer(self.target.model, request_id, inputs)


class GrpcStreamUser(_GrpcUser):
    """ModelStreamInfer: one long-lived stream per user, one request in flight on it at a time."""

    protocol = "grpc-stream"

    def send(self, request_id: str, inputs: dict[str, np.ndarray]) -> InferResponse:
        return self.client.stream_infer(self.target.model, request_id, inputs)


#: protocol name (the locust request_type) -> user class
PROTOCOLS: dict[str, type[InferenceUser]] = {
    user.protocol: user for user in (HttpJsonUser, HttpBinaryUser, GrpcUser, GrpcStreamUser)
}


def user_classes(protocols: list[str], target: Target, budget: RequestBudget) -> list[type[User]]:
    """Configured, concrete subclasses of the protocols' users (equal weights)."""
    return [
        type(
            PROTOCOLS[p].__name__,
            (PROTOCOLS[p],),
            {"abstract": False, "target": target, "budget": budget},
        )
        for p in protocols
    ]
