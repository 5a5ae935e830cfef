"""The Tinker API's work: sessions, training runs (one tenant each), sampler weights, saved
states, over the engine's primitives (Engine.submit / client_job / sample).

Names, as the SDK expects them:
    session            sess-<hex>
    training run       <session>:train:<model_seq_id>        (the SDK derives it itself on load)
    saved state        tinker://<run>/weights/<name>         CLORA_HOME/tinker/<run>/weights/<name>/
    sampler weights    tinker://<run>/sampler_weights/<name> CLORA_HOME/tinker/<run>/sampler_weights/<name>/
A saved directory is an engine checkpoint (a PEFT adapter, optimizer.pt, state.json), so it
survives engine restarts and `create_training_client_from_state_with_optimizer` resumes it.

Sampling with sampler weights samples the run's live adapter when those weights are its
current ones (the usual save -> sample -> train loop); weights the run has since trained
past, or a run that has ended, are refused with a clear error (this engine holds one set of
weights per run).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.client_jobs import CALL, FORWARD_BACKWARD, OPTIM_STEP, ClientJobError, ClientStep, datums_batch
from engine.checkpoint import load_checkpoint, write_state
from engine.core import EngineError
from engine.external_jobs import BASE_ADAPTER
from engine.rollout.base import SampleRequest
from engine.tasks.client import CLIENT_TASK
from engine.tenant import FINAL_STATES, State, derived_seed
from engine.tinker import wire
from engine.tinker.futures import Entry, FutureTable, TinkerError
from engine.tinker.losses import LossError, make_loss

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
DEFAULT_SAMPLE_TOKENS = 64
SESSION_TIMEOUT_S = 180.0  # the SDK heartbeats every 10 s; a session silent this long is over


@dataclass
class Run:
    """One Tinker training run: a tenant of the engine."""

    model_id: str
    tenant_id: str
    session_id: str
    rank: int
    saved_version: dict = field(default_factory=dict)  # sampler path -> tenant step when saved


@dataclass
class Sampler:
    sampler_id: str
    adapter: str  # a tenant id, or BASE_ADAPTER
    model_path: str | None
    run: Run | None
    version: int | None  # the run's step its weights are from (None: whatever is live)


class TinkerService:
    def __init__(self, engine):
        self.engine = engine
        self.futures = FutureTable()
        self.lock = threading.Lock()
        self.sessions: dict[str, dict] = {}
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, Sampler] = {}
        self.sweeper: threading.Thread | None = None

    # -- names and lookups --------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.engine.home / "tinker"

    @property
    def base_model(self) -> str:
        return self.engine.base_model_id

    def capabilities(self) -> dict:
        context = None
        loaded = self.engine.loaded
        if loaded is not None:
            context = getattr(loaded.trainer.model.base_model.model.config, "max_position_embeddings", None)
        return {"supported_models": [{"model_name": self.base_model, "max_context_length": context,
                                      "trainable": True, "sampleable": True}]}

    def check_base(self, base_model: str | None) -> None:
        if base_model is not None and base_model not in (self.base_model, str(self.engine.config.model)):
            raise TinkerError(f"base_model {base_model!r} is not served here: this engine serves {self.base_model!r} "
                              "(see get_server_capabilities)", 400)

    def run(self, model_id: str) -> Run:
        run = self.runs.get(model_id)
        if run is None:
            raise TinkerError(f"no training run {model_id!r} on this engine (it was never created here, or the engine "
                              "restarted: resume from a saved state with create_training_client_from_state)", 404)
        return run

    def tenant(self, run: Run):
        return self.engine.tenants.get(run.tenant_id)

    def path_dir(self, path: str) -> tuple[str, str, Path]:
        """tinker://<run>/<kind>/<name> -> (run, kind, directory)."""
        if not path.startswith("tinker://"):
            raise TinkerError(f"path {path!r}: expected tinker://<run>/weights/<name>", 400)
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights") or not parts[0] or not parts[2]:
            raise TinkerError(f"path {path!r}: expected tinker://<run>/weights/<name> or .../sampler_weights/<name>", 400)
        return parts[0], parts[1], self.root / parts[0] / parts[1] / parts[2]

    # -- sessions ---------------------------------------------------------------------------
    def create_session(self, body: dict) -> dict:
        session_id = f"sess-{secrets.token_hex(6)}"
        with self.lock:
            self.sessions[session_id] = {"created": time.time(), "tags": body.get("tags") or [],
                                         "metadata": body.get("user_metadata") or {}, "finished": None,
                                         "seen": time.time()}
            if self.sweeper is None:
                self.sweeper = threading.Thread(target=self._sweep, name="tinker-sessions", daemon=True)
                self.sweeper.start()
        return {"type": "create_session", "session_id": session_id}

    def heartbeat(self, session_id: str) -> bool:
        """False if the session is over (the SDK then stops its heartbeat)."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or session["finished"]:
                return False
            session["seen"] = time.time()
            return True

    def _sweep(self) -> None:
        """A client that went away without finishing its session (killed, lost its connection)
        must not hold adapter slots for ever: its session ends after SESSION_TIMEOUT_S of silence."""
        while not self.engine.stopping.wait(10.0):
            now = time.time()
            with self.lock:
                silent = [sid for sid, s in self.sessions.items()
                          if not s["finished"] and now - s["seen"] > SESSION_TIMEOUT_S]
            for sid in silent:
                self.engine.log(f"Tinker session {sid}: no heartbeat for {SESSION_TIMEOUT_S:.0f} s; its runs end")
                self.finish_session(sid)

    def finish_session(self, session_id: str) -> dict:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise TinkerError(f"no session {session_id!r}", 404)
            session["finished"] = session["finished"] or time.time()
            runs = [r for r in self.runs.values() if r.session_id == session_id]
        for run in runs:
            tenant = self.tenant(run)
            if tenant is not None and tenant.state not in FINAL_STATES:
                self.engine.finish(run.tenant_id)
        return {"session_id": session_id, "finished": True}

    # -- training runs --------------------------------------------------------------------------
    def _spec(self, session_id: str, seq: int, rank: int, targets: list[str], seed: int, metadata: dict | None) -> dict:
        name = str((metadata or {}).get("name") or f"tinker-{session_id[5:11]}-{seq}")
        if not NAME_RE.match(name):
            raise TinkerError(f"user_metadata.name {name!r}: use letters, digits, '-', '_' or '.'", 400)
        return {"name": name, "task": CLIENT_TASK, "steps": 1_000_000_000, "eval_every": 0,
                "checkpoint_every": 1_000_000_000, "seed": seed,
                "lora": {"rank": rank, "alpha": float(rank), "target_modules": targets}}

    def _targets(self, lora: dict) -> list[str]:
        names = set(self.engine.loaded.module_names) if self.engine.loaded is not None else set(ATTN + MLP)
        targets = [m for m in ATTN if lora.get("train_attn", True)] + [m for m in MLP if lora.get("train_mlp", True)]
        targets = [m for m in targets if m in names]
        if not targets:
            raise TinkerError("lora_config: train_attn and train_mlp are both off: nothing to train", 400)
        return targets

    def _start_run(self, session_id: str, seq: int, spec: dict, restore: Path | None = None,
                   optimizer: bool = True) -> Run:
        if session_id not in self.sessions:
            raise TinkerError(f"no session {session_id!r} (create_session first)", 404)
        model_id = f"{session_id}:train:{seq}"
        try:
            summary = self.engine.submit(spec, client=True, restore_from=restore, restore_optimizer=optimizer)
        except EngineError as exc:
            raise TinkerError(str(exc), 400) from None
        run = Run(model_id, summary["id"], session_id, spec["lora"]["rank"])
        with self.lock:
            self.runs[model_id] = run
        self.engine.log(f"{run.tenant_id} is Tinker training run {model_id}", run.tenant_id)
        return run

    def _ready_poll(self, run: Run, response: dict):
        def poll():
            tenant = self.tenant(run)
            if tenant is None:
                raise ClientJobError(f"the training run {run.model_id} is gone")
            if tenant.state == State.RUNNING:
                return True, response
            if tenant.state in FINAL_STATES:
                raise ClientJobError(f"the training run {run.model_id} ({tenant.id}) is {tenant.state.value}: "
                                     f"{tenant.error or tenant.reason}", "server" if tenant.state == State.FAILED else "user")
            return False, None
        return poll

    def _queue_state(self, run: Run):
        def state():
            tenant = self.tenant(run)
            return "paused_capacity" if tenant is not None and tenant.state in (State.PAUSED, State.QUEUED) else "active"
        return state

    def create_model(self, body: dict, key: tuple) -> tuple[str, Entry]:
        self.check_base(body.get("base_model"))
        self.heartbeat(body["session_id"])
        lora = body.get("lora_config") or {}
        optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
        if optimizer != "adamw":
            raise TinkerError(f"optimizer_config.type {optimizer!r}: this engine trains with adamw only", 400)
        # train_unembed is not honoured: LoRA goes on attention and MLP only (see the README).
        rank = int(lora.get("rank") or 32)
        seq = int(body["model_seq_id"])

        def make() -> Entry:
            spec = self._spec(body["session_id"], seq, rank, self._targets(lora),
                              int(lora.get("seed") or derived_seed(body["session_id"], seq)), body.get("user_metadata"))
            run = self._start_run(body["session_id"], seq, spec)
            return Entry(poll=self._ready_poll(run, {"model_id": run.model_id, "type": "create_model"}),
                         extra={"model_id": run.model_id})
        return self.futures.add(key, make)

    def get_info(self, model_id: str) -> dict:
        run = self.run(model_id)
        loaded = self.engine.loaded
        arch = None
        if loaded is not None:
            arch = (getattr(loaded.trainer.model.base_model.model.config, "architectures", None) or [None])[0]
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": run.rank,
                "model_name": self.base_model,
                "model_data": {"arch": arch, "model_name": self.base_model,
                               "tokenizer_id": str(loaded.model_path) if loaded is not None else None}}

    # -- training ---------------------------------------------------------------------------------
    def _job(self, run: Run, kind: str, payload, encode, key: tuple) -> tuple[str, Entry]:
        def make() -> Entry:
            try:
                future = self.engine.client_job(run.tenant_id, kind, payload)
            except ClientJobError as exc:
                raise TinkerError(str(exc), 400, exc.category) from None
            return Entry(future=future, encode=encode, waiting=self._queue_state(run))
        return self.futures.add(key, make)

    def forward_backward(self, body: bytes, content_encoding: str | None) -> tuple[str, Entry]:
        try:
            req = wire.parse_forward_backward(body, content_encoding)
        except wire.WireError as exc:
            raise TinkerError(str(exc), 400) from None
        run = self.run(req.model_id)
        key = (req.model_id, "forward_backward", req.seq_id)
        with self.futures.lock:
            if key in self.futures.keys:  # a retry: the batch is not built twice
                rid = self.futures.keys[key]
                if rid in self.futures.entries:
                    return rid, self.futures.entries[rid]
        pad = self.engine.loaded.tokenizer.pad_token_id or 0
        try:
            batch, inputs, _ = datums_batch(req.data, pad)
            loss = make_loss(req.loss_fn, req.loss_fn_config, inputs)
        except (ClientJobError, LossError) as exc:
            raise TinkerError(str(exc), 400) from None
        self._check_tokens(batch.input_ids)

        def encode(result) -> bytes:
            fields, metrics = result
            return wire.forward_backward_output(fields, metrics)
        return self._job(run, FORWARD_BACKWARD, (batch, loss, req.forward_only), encode, key)

    def _check_tokens(self, ids: torch.Tensor) -> None:
        vocab = len(self.engine.loaded.tokenizer)
        config = self.engine.loaded.trainer.model.base_model.model.config
        vocab = max(vocab, getattr(config, "vocab_size", vocab))
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise TinkerError(f"token ids must be in 0..{vocab - 1} for {self.base_model}", 400)
        limit = getattr(config, "max_position_embeddings", None)
        if limit and ids.shape[1] > limit:
            raise TinkerError(f"a datum of {ids.shape[1] - 1} tokens is longer than {self.base_model}'s context "
                              f"({limit})", 400)

    def optim_step(self, body: dict) -> tuple[str, Entry]:
        from tinker import types

        run = self.run(body.get("model_id", ""))
        try:
            request = types.OptimStepRequest.model_validate(body)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError
            raise TinkerError(f"optim_step: {exc}", 400) from None
        params = request.optim_params
        if not isinstance(params, types.AdamParams):
            raise TinkerError(f"optim_step: only Adam parameters are supported here (got {type(params).__name__})", 400)
        if params.learning_rate < 0 or not (0 <= params.beta1 < 1 and 0 <= params.beta2 < 1):
            raise TinkerError("optim_step: learning_rate must be >= 0 and beta1, beta2 in [0, 1)", 400)
        return self._job(run, OPTIM_STEP, params, lambda result: result, (run.model_id, "optim_step", request.seq_id))

    # -- saving and loading -------------------------------------------------------------------------
    def _save_name(self, name: str | None) -> str:
        name = name or f"auto-{int(time.time() * 1000)}"
        if not NAME_RE.match(name):
            raise TinkerError(f"path {name!r}: a checkpoint name is letters, digits, '-', '_' or '.'", 400)
        return name

    def save_weights(self, body: dict) -> tuple[str, Entry]:
        run = self.run(body.get("model_id", ""))
        name = self._save_name(body.get("path"))
        path = f"tinker://{run.model_id}/weights/{name}"
        _, _, directory = self.path_dir(path)
        if directory.exists() and not body.get("overwrite", False) and (directory / "state.json").exists():
            raise TinkerError(f"{path} exists (pass overwrite=True, or another name)", 409)

        def save(scheduler, tenant):
            write_state(scheduler.trainer, tenant.adapter, directory, self._state(run, tenant), optimizer=True)
            return {"path": path, "type": "save_weights"}
        return self._job(run, CALL, save, lambda r: r, (run.model_id, "save_weights", body.get("seq_id")))

    def _state(self, run: Run, tenant) -> dict:
        lora = tenant.spec.lora
        return {"step": tenant.step, "base_model": self.base_model, "model_id": run.model_id,
                "lora": {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}}

    def save_weights_for_sampler(self, body: dict) -> tuple[str, Entry]:
        run = self.run(body.get("model_id", ""))
        if body.get("path") is None:  # save_weights_and_get_sampling_client: an ephemeral sampler
            def ephemeral(scheduler, tenant):
                sampler = self._sampler(tenant.adapter, None, run, tenant.step)
                return {"sampling_session_id": sampler.sampler_id, "type": "save_weights_for_sampler"}
            return self._job(run, CALL, ephemeral, lambda r: r, (run.model_id, "save_for_sampler", body.get("seq_id")))
        name = self._save_name(body.get("path"))
        path = f"tinker://{run.model_id}/sampler_weights/{name}"
        _, _, directory = self.path_dir(path)

        def save(scheduler, tenant):
            write_state(scheduler.trainer, tenant.adapter, directory, self._state(run, tenant), optimizer=False)
            run.saved_version[path] = tenant.step
            return {"path": path, "type": "save_weights_for_sampler"}
        return self._job(run, CALL, save, lambda r: r, (run.model_id, "save_for_sampler", body.get("seq_id")))

    def load_weights(self, body: dict) -> tuple[str, Entry]:
        path = body.get("path") or ""
        _, kind, directory = self.path_dir(path)
        optimizer = bool(body.get("optimizer"))
        if not (directory / "state.json").is_file():
            raise TinkerError(f"{path}: no such saved state on this engine ({directory})", 404)
        if optimizer and not (directory / "optimizer.pt").is_file():
            raise TinkerError(f"{path} holds no optimizer state (sampler weights): load it with optimizer=False", 400)
        state = json.loads((directory / "state.json").read_text())
        self.check_base(state.get("base_model"))
        response = {"path": path, "type": "load_weights"}
        if body.get("model_id"):  # into an existing run
            run = self.run(body["model_id"])

            def load(scheduler, tenant):
                if state["lora"]["rank"] != tenant.spec.lora.rank:
                    raise ClientJobError(f"{path} has LoRA rank {state['lora']['rank']}, this run {tenant.spec.lora.rank}")
                load_checkpoint(scheduler.trainer, tenant.adapter, directory, optimizer=optimizer)
                scheduler.backend.sync_adapter(tenant.adapter)
                return {**response, "model_id": run.model_id}
            return self._job(run, CALL, load, lambda r: r, (run.model_id, "load_weights", body.get("seq_id")))
        session_id, seq = body.get("session_id"), body.get("model_seq_id")
        if session_id is None or seq is None:
            raise TinkerError("load_weights: give model_id, or session_id and model_seq_id", 400)

        def make() -> Entry:
            lora = state["lora"]
            spec = self._spec(session_id, int(seq), int(lora["rank"]), list(lora["target_modules"]),
                              derived_seed(session_id, seq), body.get("user_metadata"))
            run = self._start_run(session_id, int(seq), spec, restore=directory, optimizer=optimizer)
            return Entry(poll=self._ready_poll(run, {**response, "model_id": run.model_id}))
        return self.futures.add((session_id, "load_weights", seq), make)

    # -- sampling ------------------------------------------------------------------------------------
    def _sampler(self, adapter: str, model_path: str | None, run: Run | None, version: int | None) -> Sampler:
        sampler = Sampler(f"samp-{secrets.token_hex(6)}", adapter, model_path, run, version)
        with self.lock:
            self.samplers[sampler.sampler_id] = sampler
        return sampler

    def create_sampling_session(self, body: dict) -> dict:
        if body.get("session_id") not in self.sessions:
            raise TinkerError(f"no session {body.get('session_id')!r} (create_session first)", 404)
        sampler = self._sampler_for(body.get("model_path"), body.get("base_model"))
        return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}

    def _sampler_for(self, model_path: str | None, base_model: str | None) -> Sampler:
        if not model_path:
            self.check_base(base_model or self.base_model)
            return self._sampler(BASE_ADAPTER, None, None, None)
        run_id, kind, directory = self.path_dir(model_path)
        run = self.runs.get(run_id)
        tenant = self.tenant(run) if run is not None else None
        if run is None or tenant is None or tenant.state in FINAL_STATES:
            raise TinkerError(f"{model_path}: its training run is not live on this engine, and this engine samples "
                              "live runs only (load the saved state into a training client, then sample it)", 400)
        version = run.saved_version.get(model_path)
        if version is None and (directory / "state.json").is_file():
            version = json.loads((directory / "state.json").read_text()).get("step")
        if version is None:
            raise TinkerError(f"{model_path}: no such saved weights", 404)
        return self._sampler(tenant.adapter, model_path, run, version)

    def get_sampler(self, sampler_id: str) -> dict:
        sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise TinkerError(f"no sampler {sampler_id!r}", 404)
        return {"sampler_id": sampler.sampler_id, "base_model": self.base_model, "model_path": sampler.model_path}

    def asample(self, body: dict, header_key: str | None) -> tuple[str, Entry]:
        if body.get("prompt_logprobs") or body.get("topk_prompt_logprobs") or body.get("topk_sample_logprobs") \
                or body.get("target_prompt_logprobs") is not None or body.get("prompt_alt_tokens_k"):
            raise TinkerError("asample: prompt log-probs and top-k log-probs are not supported by this engine "
                              "(sampled tokens' log-probs are always returned)", 400)
        if body.get("sampling_session_id"):
            sampler = self.samplers.get(body["sampling_session_id"])
            if sampler is None:
                raise TinkerError(f"no sampling session {body['sampling_session_id']!r}", 404)
            key = (sampler.sampler_id, "sample", body.get("seq_id"))
        else:
            sampler = self._sampler_for(body.get("model_path"), body.get("base_model"))
            key = ("sample", header_key) if header_key else None
        if sampler.run is not None:
            tenant = self.tenant(sampler.run)
            if tenant is not None and sampler.version is not None and tenant.step != sampler.version:
                raise TinkerError(f"these sampler weights are from step {sampler.version} of {sampler.run.model_id}, "
                                  f"which has trained on to step {tenant.step}: this engine samples a run's current "
                                  "weights only (save_weights_for_sampler again)", 400)
        tokens = []
        for chunk in (body.get("prompt") or {}).get("chunks", []):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise TinkerError("asample: only text prompts (encoded_text chunks) are supported", 400)
            tokens += [int(t) for t in chunk.get("tokens", [])]
        if not tokens:
            raise TinkerError("asample: the prompt is empty", 400)
        params = body.get("sampling_params") or {}
        n = int(body.get("num_samples") or 1)
        if not 1 <= n <= 1024:
            raise TinkerError("asample: num_samples must be in 1..1024", 400)
        stop = params.get("stop")
        stop_ids = self._stop_ids(stop)
        temperature = float(params.get("temperature", 1.0))
        max_tokens = int(params.get("max_tokens") or DEFAULT_SAMPLE_TOKENS)
        seed = params.get("seed")
        request = SampleRequest(adapter=sampler.adapter, prompt_ids=tokens, n=n, max_tokens=max_tokens,
                                temperature=max(temperature, 1e-5), top_p=float(params.get("top_p", 1.0)),
                                seed=int(seed) if seed is not None else None, greedy=temperature == 0.0,
                                ignore_eos=stop == [])
        model = sampler.adapter if sampler.adapter != BASE_ADAPTER else self.base_model
        eos = self.engine.loaded.tokenizer.eos_token_id
        started = time.time()

        def encode(result) -> bytes:
            sequences = []
            for completion in result[0]:
                ids, lps = list(completion.token_ids), list(completion.logprobs)
                stopped = bool(ids) and ids[-1] == eos and stop != []
                for i, tok in enumerate(ids):
                    if tok in stop_ids:
                        ids, lps, stopped = ids[: i + 1], lps[: i + 1], True
                        break
                sequences.append((ids, lps[: len(ids)], stopped))
            self._count_sampling(sampler, started, sum(len(s[0]) for s in sequences))
            return wire.sample_response(sequences)

        def make() -> Entry:
            try:
                future = self.engine.sample(model, [request])
            except EngineError as exc:
                raise TinkerError(str(exc), 400) from None
            return Entry(future=future, encode=encode)
        rid, entry = self.futures.add(key, make)
        entry.extra["sample_sequence_ids"] = [f"{rid}:{i}" for i in range(n)]
        return rid, entry

    def _stop_ids(self, stop) -> set[int]:
        if stop is None or stop == []:
            return set()
        items = [stop] if isinstance(stop, str) else list(stop)
        ids = set()
        tokenizer = self.engine.loaded.tokenizer
        for item in items:
            if isinstance(item, int):
                ids.add(item)
                continue
            encoded = tokenizer.encode(item, add_special_tokens=False)
            if len(encoded) != 1:
                raise TinkerError(f"sampling_params.stop: {item!r} is {len(encoded)} tokens; stop strings must be "
                                  "one token here (or pass token ids)", 400)
            ids.add(encoded[0])
        return ids

    def _count_sampling(self, sampler: Sampler, started: float, tokens: int) -> None:
        """A run's sampling time in its step: the union of its requests' spans (they overlap)."""
        if sampler.run is None:
            return
        tenant = self.tenant(sampler.run)
        if tenant is None:
            return
        if tenant.client_step is None:
            tenant.client_step = ClientStep(since=tenant.ready_since or started)
        stats, now = tenant.client_step, time.time()
        stats.sample_s += max(0.0, now - max(started, stats.sampled_until, stats.since))
        stats.sampled_until = max(stats.sampled_until, now)
        stats.sampled_tokens += tokens

    def log_metrics(self, body: dict) -> dict:
        """clora extension: a client logs metrics for its run's next step (e.g. its mean reward)."""
        run = self.run(body.get("model_id", ""))
        metrics = body.get("metrics") or {}
        tenant = self.tenant(run)
        if tenant is None:
            raise TinkerError(f"{run.model_id} is gone", 404)
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise TinkerError(f"metrics.{key}: expected a finite number", 400)
            tenant.logged[str(key)] = float(value)
        return {"ok": True}
