"""Where a pipeline lives: a local folder or a hub id, and its model_index.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffdiv.config import ConfigError


def is_local(path: str | os.PathLike) -> bool:
    return Path(path).exists()


def read_model_index(path_or_id: str | os.PathLike) -> dict[str, Any]:
    """model_index.json of a local folder or a hub repository."""
    if is_local(path_or_id):
        f = Path(path_or_id) / "model_index.json"
        if not f.is_file():
            raise ConfigError(f"{path_or_id} is not a diffusers pipeline folder (no model_index.json)")
        return json.loads(f.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path_or_id), "model_index.json")).read_text())
    except Exception as e:  # offline / unknown id
        raise ConfigError(f"model '{path_or_id}' is not a local folder and could not be fetched from the hub "
                          f"({type(e).__name__})") from None
