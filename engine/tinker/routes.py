"""The Tinker API under /api/v1, as the official SDK (tinker 0.38) calls it.

Long requests (create_model, forward_backward, optim_step, save/load, asample) answer at once
with a promise {"request_id", "model_id"?, "sample_sequence_ids"?}; `retrieve_future`
long-polls its result: protobuf for ForwardBackwardOutput and SampleResponse (the SDK asks
with `Accept: application/x-protobuf`), JSON otherwise, `{"type": "try_again", ...}` while it
waits, `{"error", "category"}` when it failed. Refusals of a request itself are HTTP errors
with the same JSON body (the SDK retries 408/429/5xx, so user errors are 4xx).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from engine.tinker.futures import TinkerError
from engine.tinker.wire import PROTOBUF

router = APIRouter(prefix="/api/v1")


def service(request: Request):
    tinker = request.app.state.tinker
    if request.app.state.engine.loaded is None or getattr(request.app.state.engine, "scheduler", None) is None:
        raise TinkerError(f"the engine is still warming up ({request.app.state.engine.stage}); try again", 503,
                          "server")
    return tinker


async def body_json(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise TinkerError("the body is not JSON", 400) from None
    if not isinstance(data, dict):
        raise TinkerError("the body must be a JSON object", 400)
    return data


def promise(rid: str, entry) -> dict:
    out = {"request_id": rid}
    if entry.extra.get("model_id"):
        out["model_id"] = entry.extra["model_id"]
    if "sample_sequence_ids" in entry.extra:
        out["sample_sequence_ids"] = entry.extra["sample_sequence_ids"]
    return out


@router.post("/client/config")
async def client_config(request: Request):
    # Plain API keys (no JWT exchange); one retrieve_future per request; no server-side custom losses.
    return {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False, "sample_join_sampling_session": False, "parallel_fwdbwd_chunks": True}


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request):
    return service(request).capabilities()


@router.post("/create_session")
async def create_session(request: Request):
    return service(request).create_session(await body_json(request))


@router.post("/telemetry")
async def telemetry(request: Request):
    return {"status": "accepted"}  # the SDK's telemetry is not kept here; answering keeps its logs quiet


@router.post("/session_heartbeat")
async def heartbeat(request: Request):
    body = await body_json(request)
    if not service(request).heartbeat(str(body.get("session_id", ""))):
        raise TinkerError("the session is over (finished, or unknown to this engine)", 410)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request):
    return service(request).finish_session(session_id)


@router.post("/create_model")
async def create_model(request: Request):
    body = await body_json(request)
    for name in ("session_id", "model_seq_id", "base_model"):
        if name not in body:
            raise TinkerError(f"create_model: {name} is required", 400)
    rid, entry = service(request).create_model(body, (body["session_id"], "create_model", body["model_seq_id"]))
    return promise(rid, entry)


@router.post("/get_info")
async def get_info(request: Request):
    body = await body_json(request)
    return service(request).get_info(str(body.get("model_id", "")))


@router.post("/forward_backward")
async def forward_backward(request: Request):
    if PROTOBUF not in request.headers.get("content-type", ""):
        raise TinkerError(f"forward_backward: the body must be a {PROTOBUF} ForwardBackwardRequest (tinker >= 0.38)", 415)
    rid, entry = service(request).forward_backward(await request.body(), request.headers.get("content-encoding"))
    return promise(rid, entry)


@router.post("/optim_step")
async def optim_step(request: Request):
    rid, entry = service(request).optim_step(await body_json(request))
    return promise(rid, entry)


@router.post("/save_weights")
async def save_weights(request: Request):
    rid, entry = service(request).save_weights(await body_json(request))
    return promise(rid, entry)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request):
    rid, entry = service(request).save_weights_for_sampler(await body_json(request))
    return promise(rid, entry)


@router.post("/load_weights")
async def load_weights(request: Request):
    rid, entry = service(request).load_weights(await body_json(request))
    return promise(rid, entry)


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request):
    return service(request).create_sampling_session(await body_json(request))


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request):
    return service(request).get_sampler(sampler_id)


@router.post("/asample")
async def asample(request: Request):
    rid, entry = service(request).asample(await body_json(request), request.headers.get("x-idempotency-key"))
    return promise(rid, entry)


@router.post("/retrieve_future")
async def retrieve_future(request: Request):
    body = await body_json(request)
    rid = str(body.get("request_id", ""))
    status, value = await service(request).futures.result(rid)
    if status == "wait":
        return {"type": "try_again", "request_id": rid, "queue_state": value}
    if status == "failed":
        return value
    if isinstance(value, bytes):
        return Response(value, media_type=PROTOBUF)
    return value


@router.post("/clora/log_metrics")
async def log_metrics(request: Request):
    """clora-tui's own extension (not in the SDK): metrics for the app, e.g. a run's mean reward."""
    return service(request).log_metrics(await body_json(request))


def tinker_error(_request, exc: TinkerError):
    return JSONResponse({"error": str(exc), "category": exc.category}, status_code=exc.status)
