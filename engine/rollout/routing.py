"""Where a request of a model under a roll-out goes, and the futures that note what became of
it: the route `resolve` answers for requests naming no version, the client's future as the
roll-out sees it (the arm's response parameter added), a mirrored copy's future, and the pair
the two form until both have answered (controller.py compares it)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from convoy.types import Response

if TYPE_CHECKING:
    from convoy.batching.protocol import ModelScheduler
    from convoy.batching.stats import ModelStats
    from convoy.config import ModelConfig

    from ..repository import ModelVersion
    from .controller import Rollout

#: What a side of a pair answered: (its response, None) or (None, its error).
Answer = tuple[Response | None, BaseException | None]

#: The response parameter naming the arm that served a request (its version is the response's
#: model_version).
ARM_PARAMETER = "convoy_rollout_arm"


class Share:
    """Count-based sampling: of n offers, floor(n x rate) are taken (deterministic)."""

    __slots__ = ("rate", "seen")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.seen = 0

    def take(self) -> bool:
        if self.rate <= 0:
            return False
        if self.rate >= 1:
            return True
        self.seen += 1
        return int(self.seen * self.rate) != int((self.seen - 1) * self.rate)


def split_point(salt: str, key: str) -> float:
    """Where `key` falls in [0, 1) for this roll-out (a stable hash: the same caller, the same
    point, in every process and after a restart)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class RolloutRoute:
    """What `resolve` answers for a request naming no version while a roll-out runs: stable's
    view (the request is validated against it; both arms share the model's config), the header
    front ends read the split key from, and the roll-out that routes it in `submit`."""

    __slots__ = ("rollout",)

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    @property
    def _entry(self) -> ModelVersion:
        # The roll-out holds stable loaded (held_versions) while its route is published; were
        # it gone, the attribute read on None fails as it always did.
        return self.rollout.entry(self.rollout.stable)  # type: ignore[return-value]

    @property
    def config(self) -> ModelConfig:
        return self._entry.config

    @property
    def version(self) -> int:
        return self.rollout.stable

    @property
    def state(self) -> str:
        return self._entry.state

    @property
    def reason(self) -> str:
        return self._entry.reason

    @property
    def ready(self) -> bool:
        entry = self.rollout.entry(self.rollout.stable)
        return entry is not None and entry.ready

    @property
    def scheduler(self) -> ModelScheduler | None:
        return self._entry.scheduler

    @property
    def stats(self) -> ModelStats:
        return self._entry.stats

    @property
    def split_header(self) -> str:
        return self.rollout.spec.split_header


class Pair:
    """A client's request and its mirrored copy, compared once both have answered."""

    __slots__ = ("candidate_first", "generation", "inputs", "mirror", "primary", "request_id", "rollout")

    def __init__(
        self,
        rollout: Rollout,
        candidate_first: bool,
        generation: int,
        request_id: str,
        inputs: dict[str, np.ndarray],
    ) -> None:
        self.rollout = rollout
        #: The client's request went to the candidate (the mirror to stable).
        self.candidate_first = candidate_first
        self.generation = generation
        self.request_id = request_id
        self.inputs = inputs
        #: (Response | None, error | None) of each side once it answered.
        self.primary: Answer | None = None
        self.mirror: Answer | None = None

    def primary_done(self, response: Response | None, error: BaseException | None) -> None:
        self.primary = (response, error)
        if self.mirror is not None:
            self.rollout.paired(self)

    def mirror_done(self, response: Response | None, error: BaseException | None) -> None:
        self.mirror = (response, error)
        if self.primary is not None:
            self.rollout.paired(self)


class RoutedOutcome:
    """The client's future, seen through the roll-out: outcomes go on to it unchanged (with the
    arm's response parameter added) and are noted for the arm's figures."""

    __slots__ = ("_arm", "_client", "_generation", "_pair", "_rollout", "_start_ns")

    def __init__(
        self,
        # The request's own future (asyncio's, concurrent.futures' or a DirectOutcome): used
        # through the whole future API, beyond Request.future's OutcomeFuture.
        client: Any,
        rollout: Rollout,
        arm: str,
        start_ns: int,
        generation: int,
        pair: Pair | None,
    ) -> None:
        self._client = client
        self._rollout = rollout
        self._arm = arm
        self._start_ns = start_ns
        self._generation = generation
        self._pair = pair

    def done(self) -> bool:
        done: bool = self._client.done()
        return done

    def cancelled(self) -> bool:
        cancelled: bool = self._client.cancelled()
        return cancelled

    def result(self) -> Any:
        return self._client.result()

    def exception(self) -> Any:
        return self._client.exception()

    def cancel(self) -> Any:
        return self._client.cancel()

    def add_done_callback(self, callback: Callable[[RoutedOutcome], object]) -> None:
        self._client.add_done_callback(lambda _client: callback(self))

    def set_result(self, response: Response) -> None:
        parameters = dict(response.parameters) if response.parameters else {}
        parameters[ARM_PARAMETER] = self._arm
        response = dataclasses.replace(response, parameters=parameters)
        self._client.set_result(response)  # raises if the client gave up meanwhile: not noted
        self._rollout.served(self._arm, self._start_ns, self._generation, response, None, self._pair)

    def set_exception(self, error: BaseException) -> None:
        self._client.set_exception(error)
        self._rollout.served(self._arm, self._start_ns, self._generation, None, error, self._pair)


class MirrorOutcome:
    """A mirrored request's future: its outcome goes to the roll-out only."""

    __slots__ = ("_done", "_result", "arm", "generation", "pair", "rollout", "start_ns", "version")

    def __init__(
        self, rollout: Rollout, arm: str, version: int, start_ns: int, generation: int, pair: Pair
    ) -> None:
        self.rollout = rollout
        self.arm = arm
        self.version = version
        self.start_ns = start_ns
        self.generation = generation
        self.pair = pair
        self._done = False
        self._result = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def result(self) -> None:
        return self._result

    def exception(self) -> None:
        return None

    def add_done_callback(self, callback: Callable[[MirrorOutcome], object]) -> None:
        if self._done:
            callback(self)

    def set_result(self, response: Response) -> None:
        if not self._done:
            self._done = True
            self.rollout.mirrored(self, response, None)

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self._done = True
            self.rollout.mirrored(self, None, error)
