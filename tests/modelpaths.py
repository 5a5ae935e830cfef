"""Where tests find the embedded model (committed) and how they start engines cheaply."""


from engine.models import EMBEDDED_MODEL_DIR

BACKENDS = ["peft", "vllm"]


def model_dir() -> str:
    """The committed embedded model (tests that need it skip, via pick_model, if it is missing)."""
    return str(EMBEDDED_MODEL_DIR)


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
