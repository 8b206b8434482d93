"""The model configs `convoy tune` loads, and the server's model control it loads them through.

A candidate is the model's own config with four things changed (max_batch_size, every
instance_group's count, dynamic_batching's max_queue_delay_microseconds and
preferred_batch_size); everything else is kept as written. It travels as Triton's load
parameter `config` (JSON) and is written out as config.pbtxt (protobuf text format).

Uses tritonclient's generated ModelConfig and service stubs, never convoy.protos: like the rest
of the load generator, tune needs nothing from the server it measures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from .tune import Candidate

#: How long one load (or unload and reload) may take: a large model loads slowly.
LOAD_TIMEOUT_S = 300.0


class TuneConfigError(ValueError):
    """A config that cannot be tuned or read: the message names the file or field."""


# --- the config itself ------------------------------------------------------------------------------
def read_pbtxt(path: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except OSError as exc:
        raise TuneConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except text_format.ParseError as exc:
        raise TuneConfigError(f"{path}: {exc}") from None
    return config


def from_served(document: dict) -> mc.ModelConfig:
    """The config as the server's ModelConfig API returned it (Triton's JSON)."""
    config = mc.ModelConfig()
    try:
        json_format.ParseDict(document, config, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise TuneConfigError(f"the served model config does not parse: {exc}") from None
    return config


def tunable(config: mc.ModelConfig) -> None:
    """Refuse what the search does not cover, naming the field."""
    if config.platform == "ensemble" or config.HasField("ensemble_scheduling"):
        raise TuneConfigError(
            f"model '{config.name}': ensemble_scheduling: an ensemble has no batching or instances "
            "of its own; tune its composing models"
        )
    if config.HasField("sequence_batching"):
        raise TuneConfigError(
            f"model '{config.name}': sequence_batching: tune searches dynamic batching only"
        )


def candidate_of(config: mc.ModelConfig) -> Candidate:
    """The settings the config has now (the search's baseline)."""
    counts = [group.count or 1 for group in config.instance_group]
    batching = config.HasField("dynamic_batching")
    return Candidate(
        max_batch_size=config.max_batch_size,
        instance_count=counts[0] if counts else 1,
        max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds if batching else 0,
        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size) if batching else (),
        dynamic_batching=batching,
    )


def with_candidate(config: mc.ModelConfig, candidate: Candidate) -> mc.ModelConfig:
    """A copy of `config` with the candidate's settings; other fields (queue policies, priority
    levels, warm-up, parameters, instance kinds and GPUs) are kept."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    out.max_batch_size = candidate.max_batch_size
    if not out.instance_group:
        out.instance_group.add()
    for group in out.instance_group:
        group.count = candidate.instance_count
    if candidate.dynamic_batching and candidate.max_batch_size > 0:
        out.dynamic_batching.max_queue_delay_microseconds = candidate.max_queue_delay_us
        del out.dynamic_batching.preferred_batch_size[:]
        out.dynamic_batching.preferred_batch_size.extend(candidate.preferred_batch_sizes)
    else:
        out.ClearField("dynamic_batching")
    return out


def to_json(config: mc.ModelConfig) -> str:
    """The load parameter `config`."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


def to_pbtxt(config: mc.ModelConfig, header: str = "") -> str:
    """config.pbtxt text; `header` lines become comments above it."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + text_format.MessageToString(config)


# --- the server -------------------------------------------------------------------------------------
class ControlError(RuntimeError):
    """The server refused or failed a load; the message is the server's."""


class Transport(Protocol):
    """Model control over one protocol."""

    def model_config(self) -> dict: ...

    def load(self, config_json: str | None) -> None: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class HttpTransport:
    def __init__(self, url: str, model: str, version: str) -> None:
        import tritonclient.http as httpclient

        self._client = httpclient.InferenceServerClient(
            url, connection_timeout=LOAD_TIMEOUT_S, network_timeout=LOAD_TIMEOUT_S
        )
        self._model, self._version = model, version

    def model_config(self) -> dict:
        return self._client.get_model_config(self._model, self._version)

    def load(self, config_json: str | None) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._client.load_model(self._model, config=config_json)
        except InferenceServerException as exc:
            raise ControlError(exc.message()) from None

    def ready(self) -> bool:
        try:
            return self._client.is_model_ready(self._model, self._version)
        except Exception:  # not loaded yet, or the connection was reset
            return False

    def close(self) -> None:
        self._client.close()


class GrpcTransport:
    def __init__(self, url: str, model: str, version: str) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self._channel = grpc.insecure_channel(url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model, self._version = model, version

    def model_config(self) -> dict:
        from tritonclient.grpc import service_pb2 as pb

        answer = self._stub.ModelConfig(
            pb.ModelConfigRequest(name=self._model, version=self._version), timeout=LOAD_TIMEOUT_S
        )
        return json_format.MessageToDict(answer.config, preserving_proto_field_name=True)

    def load(self, config_json: str | None) -> None:
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        request = pb.RepositoryModelLoadRequest(model_name=self._model)
        if config_json is not None:
            request.parameters["config"].string_param = config_json
        try:
            self._stub.RepositoryModelLoad(request, timeout=LOAD_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ControlError(exc.details() or str(exc.code())) from None

    def ready(self) -> bool:
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        try:
            answer = self._stub.ModelReady(
                pb.ModelReadyRequest(name=self._model, version=self._version), timeout=10.0
            )
        except grpc.RpcError:
            return False
        return answer.ready

    def close(self) -> None:
        self._channel.close()


class ModelControl:
    """Loads candidates of one model over one transport and puts the original back."""

    def __init__(self, transport: Transport, base: mc.ModelConfig, original_served: dict) -> None:
        self.transport = transport
        #: What candidates are made from: config.pbtxt, or the config the server served.
        self.base = base
        #: The config the server served before tune loaded anything (restore compares to it).
        self.original_served = original_served

    def apply(self, candidate: Candidate) -> str | None:
        """Load the candidate and wait until the model is ready; None, or why it failed."""
        try:
            self.load(with_candidate(self.base, candidate))
        except ControlError as exc:
            return f"the server refused the config: {exc}"
        try:
            served = candidate_of(from_served(self.transport.model_config()))
        except Exception as exc:  # the server went away while loading
            return f"cannot read the served config: {type(exc).__name__}: {exc}"
        if (served.max_batch_size, served.instance_count) != (
            candidate.max_batch_size,
            candidate.instance_count,
        ):
            return f"the server serves {served.label} after loading {candidate.label}"
        return None

    def load(self, config: mc.ModelConfig | None) -> None:
        self.transport.load(to_json(config) if config is not None else None)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout_s
        while not self.transport.ready():
            if time.monotonic() > end:
                raise ControlError(f"the model was not ready {timeout_s:g} s after its load")
            time.sleep(0.05)

    def restore(self) -> bool:
        """Reload from the repository (Triton drops a load's override that way); if the server
        then serves something else (the model ran an override before tune), load that config
        back as an override. True when the served config is the original again."""
        self.load(None)
        if self.transport.model_config() == self.original_served:
            return True
        self.load(from_served(self.original_served))
        return self.transport.model_config() == self.original_served
