"""Routes of the OpenAI-compatible API (/v1): each validates into its request model and hands
off to OpenAIServing (engine/http/openai_serving.py), which calls `Engine.sample`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from engine.http import openai_types as t

router = APIRouter(prefix="/v1")


def serving(request: Request):
    return request.app.state.openai


def respond(result):
    if isinstance(result, BaseModel):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=t.ModelList)
async def list_models(request: Request):
    return serving(request).models()


@router.post("/completions")
async def create_completion(body: t.CompletionRequest, request: Request):
    return respond(await serving(request).completions(body))


@router.post("/chat/completions")
async def create_chat_completion(body: t.ChatCompletionRequest, request: Request):
    return respond(await serving(request).chat(body))
