"""Triton's simple_sequence semantics: START resets, each request adds its INPUT, OUTPUT is the
running total. Rows with READY false are padding and are left alone.

The parameter `key_by` says where the running totals live: "corrid" (per correlation ID, from
the CORRID control: right under either strategy) or "slot" (per batch row, Triton's
direct-strategy contract: right only if every request of a sequence reaches the same slot).
The parameter `delay_ms` makes each batch take that long (so concurrent sequences batch);
`fatal_value`: an INPUT equal to it raises an error the model declares fatal (the instance is
replaced).
Implicit-state models (`ACC_IN` given) keep nothing: the total travels as the state.
"""

import time

import numpy as np


class Poisoned(RuntimeError):
    """This instance cannot be trusted any more."""


class Model:
    fatal_errors = (Poisoned,)

    def initialize(self, config: dict) -> None:
        self.key_by = config["parameters"].get("key_by", "corrid")
        self.delay = float(config["parameters"].get("delay_ms", "0")) / 1000
        self.batched = config["max_batch_size"] > 0
        self.totals = {}
        fatal = config["parameters"].get("fatal_value", "")
        self.fatal_value = int(fatal) if fatal else None

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.delay:
            time.sleep(self.delay)
        values = inputs["INPUT"].reshape(-1)
        if self.fatal_value is not None and (values == self.fatal_value).any():
            raise Poisoned("poisoned by the fatal value")
        start = inputs["START"].reshape(-1)
        ready = inputs["READY"].reshape(-1) if "READY" in inputs else np.ones_like(start)
        out = np.zeros(values.shape, dtype=np.int32)
        if "ACC_IN" in inputs:
            # Implicit state: the batcher hands back what the last request returned (zeros
            # on START).
            totals = inputs["ACC_IN"].reshape(-1) + values
            out = totals.astype(np.int32)
            shape = (-1, 1) if self.batched else (1,)
            return {"OUTPUT": out.reshape(shape), "ACC_OUT": out.reshape(shape).copy()}
        corrids = inputs["CORRID"].reshape(-1) if "CORRID" in inputs else None
        for row, value in enumerate(values):
            if not ready[row]:
                continue
            key = row if self.key_by == "slot" else corrids[row]
            if isinstance(key, np.generic):
                key = key.item()
            total = 0 if start[row] else self.totals.get(key, 0)
            total += int(value)
            self.totals[key] = total
            out[row] = total
        return {"OUTPUT": out.reshape((-1, 1) if self.batched else (1,))}
