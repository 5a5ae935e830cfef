"""The scheduler's multi-turn steps: a tenant whose task is an environment runs its step as
episodes (engine.episodes.EpisodeRollout); each turn is a job in the shared batch, each
environment step a call in the scoring pool, and the finished episodes go on to training like
any scored step. Mixed into engine.scheduler.Scheduler, whose thread alone runs these.
"""

from __future__ import annotations

import concurrent.futures
import time

from engine.episodes import EpisodeRollout
from engine.tenant import Tenant


class EpisodeSteps:
    """Starting and advancing the multi-turn steps of the scheduler's tenants."""

    def start_episodes(self, tenant: Tenant, step: int, now: float) -> None:
        evaluate, train = tenant.eval_due(), step < tenant.spec.steps
        if not evaluate and not train:
            self.complete(tenant)
            return
        episodes = EpisodeRollout(tenant, self.tokenizer, step, train, evaluate, self.context_length())
        from engine.scheduler import StepWork  # the scheduler imports this module

        self.work[tenant.id] = StepWork(tag=f"{tenant.id}#{next(self.tags)}", plan={"eval": evaluate, "train": train},
                                        rollout_start=now, train_clock_start=self.train_clock, step=step,
                                        episodes=episodes)
        self.phase(tenant, "env")
        episodes.start(self.pool, self.scored.set)

    def context_length(self) -> int:
        config = self.trainer.model.base_model.model.config
        return int(getattr(config, "max_position_embeddings", None) or 4096)

    def advance_episodes(self) -> bool:
        """Multi-turn steps whose environments answered: their next turn joins the batch, or
        (every episode done) the step goes on to training like any scored step."""
        progressed = False
        for tenant_id, work in list(self.work.items()):
            episodes = work.episodes
            if episodes is None or episodes.result is not None or not episodes.busy_with_env:
                continue
            tenant = self.engine.tenants.get(tenant_id)
            try:
                requests = episodes.poll()
            except Exception as exc:  # noqa: BLE001 - the environment raised, hung or died
                self.work.pop(tenant_id, None)
                self.fail(tenant, exc, "environment")
                continue
            if requests:
                work.tag = f"{tenant.id}#{next(self.tags)}"
                try:
                    self.backend.submit(work.tag, requests)
                except Exception as exc:  # noqa: BLE001
                    self.work.pop(tenant_id, None)
                    self.fail(tenant, exc, "rollout")
                    continue
                self.phase(tenant, "rollout")
                progressed = True
            elif episodes.result is not None:
                wall = time.time() - work.rollout_start
                work.rollout_s = max(0.0, wall - episodes.env_s - (self.train_clock - work.train_clock_start))
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(episodes.result)
                work.future = done
                self.phase(tenant, "reward")
                progressed = True
        return progressed

