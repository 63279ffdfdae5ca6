"""One entry point for pretrained weights, whatever their format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxalign.models.config import TransformerConfig
from jaxalign.models.hf import load_hf_checkpoint
from jaxalign.models.llama2c import load_llama2c


def load_pretrained(
    path_or_hub_id: str | os.PathLike, **config_overrides: Any
) -> tuple[TransformerConfig, dict]:
    """Loads `(config, params)` from a llama2.c `.bin` file, a Hugging Face checkpoint directory,
    or (online) a Hugging Face hub id.

    Raises:
      FileNotFoundError, ValueError, KeyError: as `load_llama2c` / `load_hf_checkpoint`.
    """
    if Path(path_or_hub_id).suffix == ".bin":
        return load_llama2c(path_or_hub_id, **config_overrides)
    return load_hf_checkpoint(path_or_hub_id, **config_overrides)
