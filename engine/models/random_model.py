"""Random-initialised Qwen2-shaped models of a named size (`random:30M`) for throughput benchmarks.

With fixed completion lengths the work per step does not depend on the weights, so a
random model of the right shape measures what a trained one of that size would cost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from engine.models.tokenizer import build_char_tokenizer

WIDTHS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMB]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"random model size {text!r}: use a number with K, M or B, e.g. random:30M")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def shape_for(params: int) -> tuple[int, int]:
    """(hidden, layers) of a Qwen2 block stack of about `params` parameters (12*h^2 per layer)."""
    for width in WIDTHS:
        layers = round(params / (12 * width * width))
        if layers <= 24:
            return width, max(1, layers)
    return WIDTHS[-1], max(1, round(params / (12 * WIDTHS[-1] ** 2)))


def build_random_model(size: str, root: Path | None = None) -> Path:
    params = parse_size(size)
    hidden, layers = shape_for(params)
    root = Path(root or os.environ.get("CLORA_CACHE", "~/.cache/clora")).expanduser()
    out = root / f"random-{hidden}x{layers}"
    if (out / "config.json").is_file():
        return out
    tok = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
