"""The embedded default base model: a small Qwen2 with a character tokenizer."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"
