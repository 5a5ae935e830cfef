"""`clora-tui chat ID`: talk to a tenant's adapter (or the base model) in the terminal,
through the engine's OpenAI-compatible endpoint. Uses the `openai` package when it is
installed (replies stream in), plain urllib otherwise."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class ChatError(Exception):
    """The endpoint refused a message; the text is its error message."""


class ChatEndpoint:
    """POST /v1/chat/completions for one model."""

    def __init__(self, base_url: str, api_key: str, model: str, max_tokens: int | None, temperature: float):
        self.base_url, self.api_key, self.model = base_url.rstrip("/"), api_key, model
        self.params = {"temperature": temperature, **({"max_tokens": max_tokens} if max_tokens else {})}
        try:
            import openai
        except ImportError:
            self.client = None
        else:
            self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def models(self) -> list[dict]:
        """GET /v1/models: the base model and every live tenant."""
        request = urllib.request.Request(f"{self.base_url}/models", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)["data"]
        except urllib.error.HTTPError as exc:
            raise ChatError(f"{self.base_url}/models answered {exc.code}") from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc.reason}") from None

    def reply(self, messages: list[dict], out) -> str:
        """The assistant's answer, written to `out` as it arrives."""
        if self.client is None:
            text = self._post(messages)
            out(text)
            return text
        import openai

        parts = []
        try:
            for chunk in self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                             **self.params):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    parts.append(piece)
                    out(piece)
        except openai.APIStatusError as exc:
            raise ChatError(_message(exc.body) or str(exc)) from None
        except openai.APIConnectionError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc}") from None
        return "".join(parts)

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.load(response)["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as exc:
            try:
                raise ChatError(_message(json.load(exc)) or str(exc)) from None
            except ValueError:
                raise ChatError(str(exc)) from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc.reason}") from None


def _message(body) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("message")
    return None


def chat_loop(endpoint: ChatEndpoint, system: str | None, history: bool, read=input, write=print) -> None:
    """Read a line, send it (with the conversation so far unless `history` is off), print the reply.
    An empty line is skipped; `/reset` forgets the conversation; `/quit`, EOF or Ctrl-C ends."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            messages = list(start)
            write("(conversation forgotten)")
            continue
        asked = (messages if history else list(start)) + [{"role": "user", "content": text}]
        write(f"{endpoint.model}> ", end="", flush=True)
        try:
            answer = endpoint.reply(asked, lambda piece: write(piece, end="", flush=True))
        except ChatError as exc:
            write(f"\nerror: {exc}")
            continue
        write("")
        if history:
            messages = asked + [{"role": "assistant", "content": answer}]
