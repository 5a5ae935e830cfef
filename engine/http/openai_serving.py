"""The OpenAI-compatible API's work: requests -> engine.sample -> responses.

Everything between the route handlers (engine/http/openai_routes.py) and the engine's one
sampling primitive (`Engine.sample`, whose jobs join the scheduler's shared batch) lives
here: prompt encoding, chat rendering, limits, stop strings, log-probs, SSE chunks.

Chat rendering: with a tokenizer that has a `chat_template`, `apply_chat_template(...,
add_generation_prompt=True)`. Without one (the embedded model) the messages' contents are
joined with a newline, in order, and the completion continues right after the last one: a
single user message is then exactly the raw prompt a built-in task trains on (`12+7=`).

Streaming: the engine returns a job when all of its rows are done, so a streamed response is
sent once the completion is finished, as one SSE chunk per token (not token by token as
they are sampled).

Stop strings are applied to the finished text (sampling stops only at the model's EOS
token): text and token ids end at the first stop string, which is left out of the text.
Log-probs are the sampler's log-probabilities of the chosen tokens (the raw distribution,
before temperature and top-p); `top_logprobs` lists the chosen token only.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from engine.core import EngineError, EngineWarming, ModelNotReady, UnknownModel
from engine.external_jobs import SampleRefused
from engine.http import openai_types as t
from engine.rollout.base import Completion, SampleRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_DEFAULT_CHAT_TOKENS = 512  # chat without max_tokens: up to the context, at most this


class ApiError(Exception):
    """An error answered as the API's own error object (engine/http/server.py renders it)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param

    def body(self) -> dict:
        return t.ErrorResponse(error=t.ErrorInfo(message=str(self), type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


@dataclass
class Sampled:
    """One choice, cut at its first stop string: token ids and their log-probs, the text, the
    text each token adds (`pieces`, which join to `text`) and the token strings."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    pieces: list[str]
    tokens: list[str]
    finish_reason: str


class OpenAIServing:
    """Serves /v1 for one Engine (a few methods the route handlers call)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def tokenizer(self):
        if self.engine.loaded is None:
            raise ApiError(503, f"the engine is still warming up ({self.engine.stage}); try again when it is ready",
                           "service_unavailable", "engine_not_ready")
        return self.engine.loaded.tokenizer

    @property
    def context_length(self) -> int | None:
        config = self.engine.config
        model_config = getattr(self.engine.loaded.trainer.model, "config", None)
        return config.max_model_len or getattr(model_config, "max_position_embeddings", None)

    # -- models -------------------------------------------------------------------------
    def models(self) -> t.ModelList:
        base = self.engine.base_model_id
        cards = []
        for row in self.engine.models():
            tenant = row["adapter"] is not None
            cards.append(t.ModelCard(id=row["id"], created=row["created"], root=base, parent=base if tenant else None,
                                     name=row["name"], state=row["state"], step=row["step"]))
        return t.ModelList(data=cards)

    # -- completions -----------------------------------------------------------------------
    async def completions(self, req: t.CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = self.encode_prompts(req.prompt)
        max_tokens = self.max_tokens(prompts, req.max_tokens, DEFAULT_COMPLETION_TOKENS, req.n)
        results = await self.sample(req.model, self.requests(prompts, req, max_tokens))
        sampled = [(i * req.n + k, prompt, self.finish(c, req.stops))
                   for i, (prompt, groups) in enumerate(zip(prompts, results)) for k, c in enumerate(groups)]
        choices = [t.CompletionChoice(index=index, text=s.text, finish_reason=s.finish_reason,
                                      logprobs=self.completion_logprobs(s, req.logprobs), token_ids=s.token_ids,
                                      prompt_token_ids=prompt)
                   for index, prompt, s in sampled]
        usage = self.usage(prompts, choices)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            return t.CompletionResponse(id=rid, created=created, model=req.model, choices=choices, usage=usage)

        async def events():
            head = {"id": rid, "created": created, "model": req.model}
            for index, _, s in sampled:
                for j, token in enumerate(s.token_ids):
                    one = Sampled([token], [s.logprobs[j]], s.pieces[j], [s.pieces[j]], [s.tokens[j]], s.finish_reason)
                    yield sse(t.CompletionResponse(**head, choices=[t.CompletionChoice(
                        index=index, text=s.pieces[j], finish_reason=None,
                        logprobs=self.completion_logprobs(one, req.logprobs), token_ids=[token])]))
                yield sse(t.CompletionResponse(**head, choices=[t.CompletionChoice(
                    index=index, text="", finish_reason=s.finish_reason)]))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(t.CompletionResponse(**head, choices=[], usage=usage))
            yield "data: [DONE]\n\n"
        return events()

    @staticmethod
    def completion_logprobs(s: Sampled, top: int | None) -> t.CompletionLogprobs | None:
        if top is None:
            return None
        offsets, pos = [], 0
        for piece in s.pieces:
            offsets.append(pos)
            pos += len(piece)
        return t.CompletionLogprobs(tokens=s.tokens, token_logprobs=s.logprobs, text_offset=offsets,
                                    top_logprobs=[{tok: lp} for tok, lp in zip(s.tokens, s.logprobs)] if top else None)

    # -- chat ------------------------------------------------------------------------------
    async def chat(self, req: t.ChatCompletionRequest):
        prompt = self.render_chat(req.messages)
        max_tokens = self.max_tokens([prompt], req.max_completion_tokens or req.max_tokens, None, req.n)
        results = await self.sample(req.model, self.requests([prompt], req, max_tokens))
        sampled = [self.finish(c, req.stops) for c in results[0]]
        choices = []
        for k, s in enumerate(sampled):
            logprobs = t.ChatLogprobs(content=self.chat_logprobs(s, req.top_logprobs)) if req.logprobs else None
            choices.append(t.ChatChoice(index=k, message=t.AssistantMessage(content=s.text), finish_reason=s.finish_reason,
                                        logprobs=logprobs, token_ids=s.token_ids, prompt_token_ids=prompt))
        usage = self.usage([prompt], choices)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            return t.ChatCompletionResponse(id=rid, created=created, model=req.model, choices=choices, usage=usage)

        async def events():
            head = {"id": rid, "created": created, "model": req.model}
            for k, s in enumerate(sampled):
                yield sse(t.ChatCompletionChunk(**head, choices=[t.ChatChunkChoice(
                    index=k, delta=t.Delta(role="assistant", content=""))]))
                entries = self.chat_logprobs(s, req.top_logprobs) if req.logprobs else []
                for j, token in enumerate(s.token_ids):
                    lp = t.ChatLogprobs(content=[entries[j]]) if req.logprobs else None
                    yield sse(t.ChatCompletionChunk(**head, choices=[t.ChatChunkChoice(
                        index=k, delta=t.Delta(content=s.pieces[j]), logprobs=lp, token_ids=[token])]))
                yield sse(t.ChatCompletionChunk(**head, choices=[t.ChatChunkChoice(
                    index=k, delta=t.Delta(), finish_reason=s.finish_reason)]))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(t.ChatCompletionChunk(**head, choices=[], usage=usage))
            yield "data: [DONE]\n\n"
        return events()

    @staticmethod
    def chat_logprobs(s: Sampled, top: int | None) -> list[t.TokenLogprob]:
        out = []
        for token, lp in zip(s.tokens, s.logprobs):
            raw = list(token.encode())
            alternatives = [t.TopLogprob(token=token, logprob=lp, bytes=raw)] if top else []
            out.append(t.TokenLogprob(token=token, logprob=lp, bytes=raw, top_logprobs=alternatives))
        return out

    # -- pieces ----------------------------------------------------------------------------
    def encode_prompts(self, prompt) -> list[list[int]]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        out = []
        for p in prompts:
            ids = tok.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
            vocab = len(tok)
            if not ids:
                raise ApiError(400, "prompt: a prompt encodes to no tokens", param="prompt")
            if any(i < 0 or i >= vocab for i in ids):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def render_chat(self, messages: list[t.ChatMessage]) -> list[int]:
        tok = self.tokenizer
        try:
            texts = [{"role": m.role, "content": m.text()} for m in messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(texts, tokenize=False, add_generation_prompt=True)
        else:
            rendered = "\n".join(m["content"] for m in texts)
        ids = tok.encode(rendered, add_special_tokens=False)
        if not ids:
            raise ApiError(400, "messages: the conversation encodes to no tokens", param="messages")
        return ids

    def max_tokens(self, prompts: list[list[int]], asked: int | None, default: int | None, n: int) -> int:
        """The completion budget: what was asked (or the default), within the model's context
        and the engine's work budget (--max-step-tokens)."""
        longest = max(len(p) for p in prompts)
        context = self.context_length
        room = (context - longest) if context else None
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {longest} tokens; this model's context is {context} tokens",
                           param="messages" if default is None else "prompt", code="context_length_exceeded")
        value = asked or default or min(room or MAX_DEFAULT_CHAT_TOKENS, MAX_DEFAULT_CHAT_TOKENS)
        if room is not None and value > room:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt is {longest} tokens, so "
                           f"max_tokens can be at most {room} (asked {value})", param="max_tokens",
                           code="context_length_exceeded")
        work = len(prompts) * n * (longest + value)
        budget = self.engine.config.max_step_tokens
        if work > budget:
            raise ApiError(400, f"this request would sample {work:,} tokens (prompts x n x (prompt + max_tokens)), "
                           f"above the engine's budget of {budget:,}; lower n or max_tokens", param="n")
        return value

    @staticmethod
    def requests(prompts: list[list[int]], req: t.SamplingFields, max_tokens: int) -> list[SampleRequest]:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        return [SampleRequest(adapter="", prompt_ids=ids, n=req.n, max_tokens=max_tokens,
                              temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                              seed=(seed * 1_000_003 + i) % (1 << 62), greedy=temperature == 0)
                for i, ids in enumerate(prompts)]

    async def sample(self, model: str, requests: list[SampleRequest]) -> list[list[Completion]]:
        try:
            future = self.engine.sample(model, requests)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), code="model_not_found", param="model") from None
        except EngineWarming as exc:
            raise ApiError(503, str(exc), "service_unavailable", "engine_not_ready") from None
        except ModelNotReady as exc:
            raise ApiError(409, str(exc), code="model_not_ready", param="model") from None
        except (EngineError, SampleRefused) as exc:
            raise ApiError(503, str(exc), "service_unavailable", "engine_stopping") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client went away: its rows leave the batch
            raise
        except SampleRefused as exc:
            if exc.kind == "gone":
                raise ApiError(409, str(exc), code="model_gone", param="model") from None
            if exc.kind == "stopping":
                raise ApiError(503, str(exc), "service_unavailable", "engine_stopping") from None
            raise ApiError(500, str(exc), "server_error") from None

    def finish(self, completion: Completion, stops: list[str]) -> Sampled:
        """The choice's text and tokens, cut at its first stop string."""
        tok = self.tokenizer
        ids, lps = list(completion.token_ids), list(completion.logprobs)
        finish = "stop" if completion.finished else "length"
        prefixes = [""]  # prefixes[k]: the text of the first k tokens (incremental detokenization)
        cut = None
        longest_stop = max((len(s) for s in stops), default=0)
        for k in range(len(ids)):
            text = tok.decode(ids[: k + 1], skip_special_tokens=True)
            prefixes.append(text)
            if stops:
                window = text[max(0, len(prefixes[k]) - longest_stop + 1):]
                offset = len(text) - len(window)
                hits = [window.find(s) for s in stops if s in window]
                if hits:
                    cut = (k + 1, offset + min(hits))
                    break
        if cut is not None:
            keep, at = cut
            ids, lps, finish = ids[:keep], lps[:keep], "stop"
            prefixes = [p[:at] for p in prefixes]
        pieces = [prefixes[k + 1][len(prefixes[k]):] if prefixes[k + 1].startswith(prefixes[k]) else prefixes[k + 1]
                  for k in range(len(ids))]
        text = "".join(pieces)
        tokens = [tok.decode([i]) for i in ids]
        if len(lps) < len(ids):  # a backend without log-probs
            lps = lps + [0.0] * (len(ids) - len(lps))
        return Sampled(ids, lps, text, pieces, tokens, finish)

    @staticmethod
    def usage(prompts: list[list[int]], choices) -> t.Usage:
        prompt = sum(len(p) for p in prompts)
        completion = sum(len(c.token_ids or []) for c in choices)
        return t.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(model) -> str:
    return f"data: {json.dumps(model.model_dump())}\n\n"
