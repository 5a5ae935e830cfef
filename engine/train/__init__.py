"""Training: the GRPO objective and the multi-adapter PEFT trainer."""
