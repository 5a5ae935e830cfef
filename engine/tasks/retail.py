"""`retail`: a small tool-use world in the spirit of tau-bench retail, as a multi-turn environment.

Each episode is a generated store (a few orders: id, item, status, price) and one customer
request about one order. The model acts by calling tools written as text, reads each tool's
answer, and finally answers the customer:

    customer   status?17               | price?17             | cancel?17
    model      look:17                 | look:17              | cancel:17
    tool       =shipped,lamp,23:       | =shipped,lamp,23:    | =ok:   (or =no,shipped:)
    model      shipped                 | 23                   | done   (or cannot)

The reward (1 or 0) is judged from the store's final state and the answer: a status or a
price is right only if nothing was changed; a cancel request is right when a pending order
was cancelled (and nothing else) and the answer is `done`, or when a shipped or delivered
order was left alone and the answer is `cannot`. More than 3 tool calls end the episode with
reward 0. `tool_latency_ms` makes every tool call wait, like a remote service.

Written to the alphabet of the embedded model's tokenizer (no brackets, no spaces): `look:17`.
"""

from __future__ import annotations

import asyncio
import re

from engine.tasks.base import rng_for

ITEMS = ("lamp", "desk", "mug", "sofa", "rug", "fan", "bed", "cup", "pen", "map")
STATUSES = ("pending", "shipped", "delivered")
INTENTS = ("status", "price", "cancel")
MAX_CALLS = 3
TOOL_RE = re.compile(r"^(look|cancel):(\d+)$")
EVAL_SEED = 0x5EED


def make_store(seed: int, index: int, orders: int = 5):
    """(orders {id: [status, item, price]}, target id, intent) of one episode."""
    rng = rng_for(seed, index, salt=0x7E7A11)
    ids = rng.sample(range(10, 100), orders)
    store = {i: [rng.choice(STATUSES), rng.choice(ITEMS), rng.randint(5, 99)] for i in ids}
    return store, rng.choice(ids), rng.choice(INTENTS)


def question(target: int, intent: str) -> str:
    return f"{intent}?{target}"


def tool_answer(store: dict, name: str, order: int) -> str:
    if order not in store:
        return "=none:"
    status, item, price = store[order]
    if name == "look":
        return f"={status},{item},{price}:"
    if status != "pending":
        return f"=no,{status}:"
    store[order][0] = "cancelled"
    return "=ok:"


def judge(initial: dict, final: dict, target: int, intent: str, answer: str) -> float:
    answer = answer.strip()
    status, _, price = initial[target]
    if intent in ("status", "price"):
        right = status if intent == "status" else str(price)
        return 1.0 if final == initial and answer == right else 0.0
    if status == "pending":
        expected = {**initial, target: ["cancelled", *initial[target][1:]]}
        return 1.0 if final == expected and answer == "done" else 0.0
    return 1.0 if final == initial and answer == "cannot" else 0.0


class RetailEnv:
    """One episode of the retail world (see the module's docstring)."""

    reward_mode = "last"  # the episode's reward is its final answer's
    role = "tool"  # with a chat template, tool answers are `tool` messages

    def __init__(self, tool_latency_ms: float = 0.0, orders: int = 5):
        if not 0 <= float(tool_latency_ms) <= 60_000:
            raise ValueError("tool_latency_ms must be in 0..60000")
        if not 1 <= int(orders) <= 20:
            raise ValueError("orders must be in 1..20")
        self.latency = float(tool_latency_ms) / 1000.0
        self.orders = int(orders)

    def reset(self, seed: int, index: int) -> str:
        self.store, self.target, self.intent = make_store(seed, index, self.orders)
        self.initial = {k: list(v) for k, v in self.store.items()}
        self.calls = 0
        return question(self.target, self.intent)

    async def step(self, text: str):
        text = text.strip()
        call = TOOL_RE.match(text)
        if call is None:  # a final answer
            return None, judge(self.initial, self.store, self.target, self.intent, text), True
        self.calls += 1
        if self.calls > MAX_CALLS:
            return None, 0.0, True
        if self.latency:
            await asyncio.sleep(self.latency)
        return tool_answer(self.store, call.group(1), int(call.group(2))), 0.0, False


def solution(seed: int, index: int, orders: int = 5) -> list[tuple[str, bool]]:
    """The right transcript of an episode as (text, spoken by the model) segments."""
    store, target, intent = make_store(seed, index, orders)
    status, item, price = store[target]
    segments = [(question(target, intent), False)]
    if intent == "cancel":
        segments += [(f"cancel:{target}", True), ("=ok:" if status == "pending" else f"=no,{status}:", False),
                     ("done" if status == "pending" else "cannot", True)]
    else:
        segments += [(f"look:{target}", True), (f"={status},{item},{price}:", False),
                     (status if intent == "status" else str(price), True)]
    return segments
