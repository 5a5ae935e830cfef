"""A local Tinker backend: the official `tinker` SDK, unmodified, trains tenants of this engine.

    wire.py      protobuf in and out (the SDK's own generated module, tinker.proto)
    losses.py    the loss functions Tinker names, on per-token log-probs
    futures.py   request ids, idempotency, long-polled results
    service.py   sessions, training runs (tenants), sampler weights, saved states
    routes.py    the /api/v1 routes of the engine's HTTP server
"""
