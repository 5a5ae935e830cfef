"""Inference backends behind one interface: vLLM multi-LoRA and PEFT mixed-adapter batches."""

from engine.rollout.base import Completion, RolloutBackend, SampleRequest

__all__ = ["Completion", "RolloutBackend", "SampleRequest"]
