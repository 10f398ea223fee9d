"""Tiny, randomly initialized CLIP checkpoints built offline (for tests and smoke runs).

`build_tiny_clip(path)` writes a real `CLIPModel` + `CLIPTokenizer` + image-processor config with
`save_pretrained`, so `CLIPModel.from_pretrained(path)` exercises the normal loading code.
The tokenizer is a byte-level BPE whose vocabulary holds every byte (so any text tokenizes), a few
merges and the CLIP special tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte -> printable-character table, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


TINY_MERGES = ["t h", "th e</w>", "o f</w>", "a n", "an d</w>", "p h", "o t", "ph ot", "phot o</w>"]


def build_tiny_tokenizer(path: str | Path, max_length: int = 32):
    """Write and load a tiny CLIP BPE tokenizer into `path` (returns the loaded tokenizer)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in TINY_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as raw:
        (Path(raw) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(raw) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
        tok = CLIPTokenizer.from_pretrained(raw, model_max_length=max_length)
        tok.save_pretrained(path)
    return CLIPTokenizer.from_pretrained(path)


def build_tiny_clip(
    path: str | Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 32,
    max_length: int = 32,
) -> Path:
    """Save a tiny random CLIPModel, its tokenizer and preprocessor config to `path`; return the path."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tok = build_tiny_tokenizer(path, max_length=max_length)
    text = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection_dim,
    )
    vision = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    processor_config = {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    return path
