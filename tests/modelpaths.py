"""Where tests find the embedded model (committed) and how they start engines cheaply."""


from engine.models import EMBEDDED_MODEL_DIR

BACKENDS = ["peft", "vllm"]


def model_dir() -> str:
    if (EMBEDDED_MODEL_DIR / "config.json").is_file():
        return str(EMBEDDED_MODEL_DIR)
    return "/tmp/m_try"  # a developer's scratch model before the embedded one exists


def tiny_spec(name: str, **overrides) -> dict:
    """An experiment small enough to step in well under a second on two cores."""
    spec = {"name": name, "steps": 4, "checkpoint_every": 2, "eval_every": 0,
            "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_tokens": 6}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec.setdefault(key, {}).update(value)
        else:
            spec[key] = value
    return spec
