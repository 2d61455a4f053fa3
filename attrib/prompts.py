"""Prompt formats, read from the versioned configuration ``attrib/configs/prompts.yaml``."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

PROMPTS_FILE = Path(__file__).parent / "configs" / "prompts.yaml"


@lru_cache(maxsize=None)
def load_prompts(path: str | Path = PROMPTS_FILE) -> dict[str, str]:
    """{"vqa": "{src} The answer is:", "loc": "{loc}?", "m_loc": ..., "caption": "{src}"}."""
    prompts = yaml.safe_load(Path(path).read_text())
    missing = {"vqa", "loc", "m_loc", "caption"} - set(prompts)
    if missing:
        raise ValueError(f"{path}: missing prompt formats {sorted(missing)}")
    return prompts
