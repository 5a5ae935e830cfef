"""The engine's HTTP APIs: one ASGI app (FastAPI, served by uvicorn in a thread of the daemon),
bound to 127.0.0.1 and keyed by a key derived from the engine's token. Today it serves the
OpenAI-compatible API under /v1; the Tinker API (/api/v1) is meant to join the same app."""
