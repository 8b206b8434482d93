"""Serve the benchmark MLP on PyTriton (run with .peers/pytriton/bin/python, not Convoy's venv).

A batched infer function behind Triton's dynamic batcher with Convoy's max batch and queue
delay. Prints one `pytriton: serving http=H grpc=G` line when the model is loaded, then serves
until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import signal

import numpy as np
from mlp import IN_FEATURES, INPUT, OUT_FEATURES, OUTPUT, forward, load_layers
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--max-queue-delay-us", type=int, required=True)
    parser.add_argument("--access-token", required=True, help="guards statistics (perf_analyzer -H)")
    args = parser.parse_args()
    layers = load_layers(args.weights)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT: forward(layers, inputs[INPUT])}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # serve() stops on SIGINT only; turn SIGTERM into the same clean shutdown.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    security = TritonSecurityConfig(access_token=args.access_token)
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name=INPUT, dtype=np.float32, shape=(IN_FEATURES,))],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(OUT_FEATURES,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.run()
        print(f"pytriton: serving http={args.http_port} grpc={args.grpc_port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            triton.serve()


if __name__ == "__main__":
    main()
