"""Open Inference Protocol (KServe V2) and Triton ModelConfig messages, generated at build time.

Only `server/` imports this package; the rest of Convoy sees plain Python types.
"""
