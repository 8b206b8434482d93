"""The engine over IPC, in three modules, one per role:

- messages.py: the typed messages a --workers front-end process and the engine process exchange
  (convoy/wire.py frames over a private Unix socket pair);
- endpoint.py: `EngineEndpoint`, the engine process's side, serving one front-end process;
- client.py: `RemoteEngine`, the EngineClient a front-end process holds.

Per loop turn a front end sends one frame with every request that arrived in that turn; the
engine answers in one frame per loop turn too, so a batch's answers to one front end travel
together. The engine pushes the model table whenever a model changes (a load, an unload, an
instance lost or replaced), so a front end resolves models, checks readiness and answers
metadata without asking; statistics, the repository index, load/unload and log settings are
calls.

Nothing is re-exported here: a front-end process imports client.py (and messages.py) only, so it
never loads the engine, its schedulers or its runtimes.
"""
