"""One step of a multi-turn tenant: its episodes, turn by turn, between the shared sampler and
the tenant's environment worker.

    reset (every episode, in the worker)  ->  sample a turn (all live episodes: one job in the
    shared batch)  ->  env step (all of them at once, in the worker)  ->  ... until every
    episode is done, out of turns (`rollout.max_turns`) or out of context

The scheduler drives it (`poll` each cycle; `sampled` when its turn's job is back); the
environment's calls run in the scoring pool, so while one tenant waits on its tools the
sampler is busy with everyone else's rows. A GRPO group is `num_generations` episodes of
the same (seed, index): they share the first observation, sampled as one request.

Only the model's tokens are trained: the train batch's prompt is the first observation and
its completion is every later token, with the completion mask on the model's turns only
(environment tokens count in neither the loss nor the sampler/trainer log-prob check).
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from dataclasses import dataclass, field

import torch

from engine.rollout.base import SampleRequest
from engine.scoring import completion_text
from engine.tenant import derived_seed
from engine.train.batch import TrainBatch
from engine.train.grpo import group_advantages


@dataclass
class Episode:
    key: str
    seed: int
    index: int
    group: int  # training: its GRPO group; eval episodes: -1
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    trained: list[float] = field(default_factory=list)  # 1 on the model's tokens
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    turns: int = 0
    done: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class Renderer:
    """Turns as tokens: with a chat template, messages (environment turns as `role` messages);
    without one (the embedded model), the texts one after the other."""

    def __init__(self, tokenizer, role: str):
        self.tokenizer, self.role = tokenizer, role
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages, generation: bool) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                                       return_dict=False))

    def first(self, episode: Episode, obs: str) -> None:
        if self.chat:
            episode.messages = [{"role": "user", "content": obs}]
            episode.prompt = self._render(episode.messages, True)
        else:
            episode.prompt = self.tokenizer.encode(obs, add_special_tokens=False)

    def observation(self, episode: Episode, model_text: str, obs: str) -> list[int]:
        if not self.chat:
            return self.tokenizer.encode(obs, add_special_tokens=False)
        episode.messages.append({"role": "assistant", "content": model_text})
        before = self._render(episode.messages, False)
        episode.messages.append({"role": self.role, "content": obs})
        after = self._render(episode.messages, True)
        return after[len(before):] if after[: len(before)] == before else after[len(before):]


class EpisodeRollout:
    """The episodes of one step (training groups and, when due, the greedy eval)."""

    def __init__(self, tenant, tokenizer, step: int, train: bool, evaluate: bool, context: int):
        self.tenant, self.tokenizer, self.step = tenant, tokenizer, step
        ro, task = tenant.spec.rollout, tenant.task
        self.context = context
        self.episodes: list[Episode] = []
        if evaluate:
            for i, (seed, index) in enumerate(task.eval_episodes()):
                self.episodes.append(Episode(f"v{i}", seed, index, -1))
        if train:
            start = step * ro.prompts_per_step
            for g, (seed, index) in enumerate(task.episodes(tenant.spec.seed, start, ro.prompts_per_step)):
                for k in range(ro.num_generations):
                    self.episodes.append(Episode(f"t{g}.{k}", seed, index, g))
        self.has_train, self.has_eval = train, evaluate
        self.future: concurrent.futures.Future | None = None  # the environment call in flight
        self.env_s = 0.0
        self.sampling: list[Episode] = []  # the episodes of the turn being sampled
        self.renderer: Renderer | None = None
        self.started = time.time()
        self.result: dict | None = None

    # -- the scheduler's side ---------------------------------------------------------
    def start(self, pool, wake) -> None:
        self.wake = wake
        self._env(pool, self._reset)

    def _env(self, pool, fn) -> None:
        self.future = pool.submit(self._timed, fn)
        self.future.add_done_callback(lambda _f: self.wake())

    def _timed(self, fn):
        t0 = time.time()
        try:
            return fn()
        finally:
            self.env_s += time.time() - t0

    def poll(self) -> list[SampleRequest] | None:
        """After an environment call: the next turn's requests (None while it is in flight, or
        once every episode is done: see `result`). Raises what the environment raised."""
        if self.future is None or not self.future.done():
            return None
        future, self.future = self.future, None
        future.result()  # an environment failure fails the tenant
        requests = self._next_turn()
        if not requests:
            self.result = self._outcome()
            return None
        return requests

    def sampled(self, pool, completions: list) -> None:
        """The turn's job is back: record the model's tokens, then step the environments."""
        flat = [c for group in completions for c in group]
        texts = {}
        for episode, completion in zip(self.sampling, flat):
            ids, lps = list(completion.token_ids), list(completion.logprobs)
            episode.tokens += ids
            episode.trained += [1.0] * len(ids)
            episode.logprobs += lps if len(lps) == len(ids) else [0.0] * len(ids)
            episode.turns += 1
            texts[episode.key] = completion_text(self.tokenizer, completion)
        live = list(self.sampling)
        self.sampling = []
        self._env(pool, lambda: self._step(live, texts))

    @property
    def busy_with_env(self) -> bool:
        return self.future is not None

    # -- environment calls (pool threads) ---------------------------------------------------
    def _reset(self) -> None:
        worker = self.tenant.env
        obs = worker.reset([(e.key, e.seed, e.index) for e in self.episodes], self.tenant.spec.reward_timeout_s)
        self.renderer = Renderer(self.tokenizer, worker.info.get("role", "user"))
        for episode, first in zip(self.episodes, obs):
            self.renderer.first(episode, first)

    def _step(self, live: list[Episode], texts: dict) -> None:
        worker = self.tenant.env
        results = worker.step([(e.key, texts[e.key]) for e in live], self.tenant.spec.reward_timeout_s)
        for episode, (obs, reward, done) in zip(live, results):
            episode.rewards.append(reward)
            if done or obs is None:
                episode.done = True
                continue
            ids = self.renderer.observation(episode, texts[episode.key], obs)
            episode.tokens += ids
            episode.trained += [0.0] * len(ids)
            episode.logprobs += [0.0] * len(ids)

    # -- turns ---------------------------------------------------------------------------------
    def _next_turn(self) -> list[SampleRequest]:
        ro = self.tenant.spec.rollout
        requests, self.sampling = [], []
        for episode in self.episodes:
            if episode.done:
                continue
            room = self.context - episode.length
            if episode.turns >= ro.max_turns or room < 1:
                episode.done = True  # out of turns or of context: the episode ends as it stands
                continue
            self.sampling.append(episode)
        if not self.sampling:
            return []
        first_turn = all(e.turns == 0 for e in self.sampling)
        if first_turn:  # a group's episodes share the first observation: one request of n samples
            by_group: dict = {}
            for e in self.sampling:
                by_group.setdefault((e.group, e.seed, e.index) if e.group >= 0 else e.key, []).append(e)
            order = []
            for key, members in by_group.items():
                e = members[0]
                requests.append(self._request(e, len(members), greedy=e.group < 0))
                order += members
            self.sampling = order
        else:
            requests = [self._request(e, 1, greedy=e.group < 0) for e in self.sampling]
        return requests

    def _request(self, episode: Episode, n: int, greedy: bool) -> SampleRequest:
        ro = self.tenant.spec.rollout
        return SampleRequest(adapter=self.tenant.adapter, prompt_ids=episode.prompt + episode.tokens, n=n,
                             max_tokens=max(1, min(ro.max_tokens, self.context - episode.length)),
                             temperature=ro.temperature, top_p=ro.top_p, greedy=greedy,
                             seed=0 if greedy else derived_seed(self.tenant.spec.seed, self.step, episode.key,
                                                                episode.turns),
                             priority=self.tenant.spec.priority)

    # -- the step's outcome ---------------------------------------------------------------------
    def reward_of(self, episode: Episode) -> float:
        if not episode.rewards:
            return 0.0
        mode = (self.tenant.env.info or {}).get("reward_mode", "sum")
        return episode.rewards[-1] if mode == "last" else sum(episode.rewards)

    def _outcome(self) -> dict:
        out = {"eval_accuracy": None, "batch": None, "reward_s": self.env_s, "sampler_lp": None, "turns": None}
        evals = [e for e in self.episodes if e.group < 0]
        if evals:
            out["eval_accuracy"] = sum(self.reward_of(e) > 0 for e in evals) / len(evals)
        train = [e for e in self.episodes if e.group >= 0]
        if not train:
            return out
        rewards = [self.reward_of(e) for e in train]
        pad = self.tokenizer.pad_token_id or 0
        p_width = max(len(e.prompt) for e in train)
        c_width = max(1, max(len(e.tokens) for e in train))
        ids = torch.full((len(train), p_width + c_width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        cmask = torch.zeros((len(train), c_width))
        lp = torch.zeros((len(train), c_width))
        for r, e in enumerate(train):
            p, n = len(e.prompt), len(e.tokens)
            ids[r, p_width - p : p_width] = torch.tensor(e.prompt)
            attn[r, p_width - p : p_width + n] = 1
            if n:
                ids[r, p_width : p_width + n] = torch.tensor(e.tokens)
                cmask[r, :n] = torch.tensor(e.trained)
                lp[r, :n] = torch.tensor(e.logprobs)
        adv = group_advantages(torch.tensor(rewards), self.tenant.spec.rollout.num_generations,
                               scale=self.tenant.spec.grpo.scale_rewards)
        batch = TrainBatch(input_ids=ids, attention_mask=attn, completion_mask=cmask, advantages=adv,
                           prompt_width=p_width)
        out.update(batch=batch, rewards=rewards, correct=[r > 0 for r in rewards], sampler_lp=lp,
                   turns=statistics.fmean(e.turns for e in train))
        return out
