"""clora-tui engine: one warm base model, many LoRA tenants trained with GRPO."""

__version__ = "0.1.0"
