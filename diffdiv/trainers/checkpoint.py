"""Atomic checkpoints: write into a temp dir, seal with a checksummed manifest, rename; resume the latest valid.

Layout of `<output_dir>/checkpoints/step_NNNNNNNN/`: the networks and optimizers (written by a `write_models`
callable: accelerate's `save_state`, or a sharded writer), `trainer_state.json` + `trainer_tensors.safetensors`
(counters, RNG, EMA shadows, registered objects) and `COMPLETE.json` (sizes and sha256 of every file). A folder
without a valid manifest is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffdiv.config import ConfigError

CKPT_PREFIX = "step_"
COMPLETE_FILE = "COMPLETE.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_tensors.safetensors"

Payload = tuple[dict[str, Any], dict[str, Tensor]]


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def list_checkpoints(ckpt_dir: Path, step: int | None = None) -> list[Path]:
    """Checkpoint dirs (sealed or not), oldest first; `step` keeps only that step's."""
    if not Path(ckpt_dir).is_dir():
        return []
    out = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    if step is not None:
        out = [p for p in out if p.name == checkpoint_name(step)]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def checkpoint_files(path: Path) -> list[Path]:
    """Every file under a checkpoint dir except the manifest (sharded writers use sub-folders)."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != COMPLETE_FILE)


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is sealed and every file matches its manifest, else the problem."""
    path = Path(path)
    mf = path / COMPLETE_FILE
    if not path.is_dir():
        return "not a directory"
    if not mf.is_file():
        return "incomplete (no COMPLETE.json manifest: the save was interrupted)"
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, OSError):
        return "manifest unreadable"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != info["size"]:
            return f"file {name} has the wrong size (truncated or overwritten)"
        if sha256_file(f) != info["sha256"]:
            return f"file {name} is corrupt (checksum mismatch)"
    return None


def seal(tmp: Path, step: int, world: int) -> None:
    """Write the manifest (size + sha256 of every file) and fsync it: the checkpoint is now complete."""
    files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in checkpoint_files(tmp)}
    manifest = {"step": step, "time": time.time(), "world": world, "files": files}
    with open(tmp / COMPLETE_FILE, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a sealed temp dir to its final name."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(ckpt_dir)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(ckpt_dir: Path) -> None:
    """Delete temp dirs left by saves that a crash interrupted."""
    if Path(ckpt_dir).is_dir():
        for stale in Path(ckpt_dir).glob(f".tmp-{CKPT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def write_payload(path: Path, payload: Payload) -> None:
    js, tens = payload
    save_file(tens, str(path / STATE_TENSORS))
    (path / STATE_JSON).write_text(json.dumps(js))


def read_payload(path: Path) -> Payload:
    return json.loads((path / STATE_JSON).read_text()), load_file(str(path / STATE_TENSORS))


def save_checkpoint(acc: Any, ckpt_dir: Path, step: int, keep_last: int, payload: Callable[[], Payload],
                    write_models: Callable[[Path], None]) -> Path:
    """Every rank writes its part into a temp dir; rank 0 adds the payload, seals, renames and rotates."""
    final = Path(ckpt_dir) / checkpoint_name(step)
    tmp = Path(ckpt_dir) / f".tmp-{checkpoint_name(step)}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    write_models(tmp)
    if acc.is_main_process:
        write_payload(tmp, payload())
    acc.wait_for_everyone()
    if acc.is_main_process:
        seal(tmp, step, acc.num_processes)
        publish(tmp, final)
        rotate(ckpt_dir, keep_last)
    acc.wait_for_everyone()
    return final


def resume_candidates(ckpt_dir: Path, resume: str | None) -> list[Path]:
    """Checkpoints to try, newest first: `latest` = every one in ckpt_dir; a path = just that one."""
    if resume is None or resume in ("", "none", "never"):
        return []
    if resume == "latest":
        return list(reversed(list_checkpoints(ckpt_dir)))
    return [Path(resume)]


def resume_checkpoint(ckpt_dir: Path, resume: str | None, read_models: Callable[[Path], None],
                      load_payload: Callable[[Payload], None], log: Callable[[str], None]) -> Path | None:
    """Load the newest valid checkpoint; a damaged one is skipped (`latest`) or a ConfigError (explicit path)."""
    for ck in resume_candidates(ckpt_dir, resume):
        problem = verify_checkpoint(ck)
        if problem:
            log(f"skipping checkpoint {ck}: {problem}")
            if resume != "latest":
                raise ConfigError(f"resume={resume}: {problem}")
            continue
        try:
            read_models(ck)
            load_payload(read_payload(ck))
        except Exception as e:  # corrupt despite the manifest
            log(f"skipping checkpoint {ck}: cannot load ({type(e).__name__}: {e})")
            if resume != "latest":
                raise ConfigError(f"resume={resume}: cannot load ({type(e).__name__})") from None
            continue
        return ck
    return None


def write_rng_state(path: Path, rank: int) -> None:
    """This rank's global RNG states (torch CPU and CUDA, Python, NumPy), no pickle (sharded checkpoints)."""
    import numpy as np

    tens = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tens.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tens, str(Path(path) / f"rng_state_{rank}.safetensors"))
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    (Path(path) / f"rng_state_{rank}.json").write_text(json.dumps(js))


def read_rng_state(path: Path, rank: int) -> None:
    import numpy as np

    tens = load_file(str(Path(path) / f"rng_state_{rank}.safetensors"))
    torch.set_rng_state(tens["torch"])
    cuda = [tens[f"cuda.{i}"] for i in range(len([k for k in tens if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    js = json.loads((Path(path) / f"rng_state_{rank}.json").read_text())
    version, state, gauss = js["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def tensors_to_cpu(sd: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if torch.is_tensor(v)}
