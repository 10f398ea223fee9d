"""Streaming image folders (decode per batch, sharded by rank) and batched prompt encoding."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffdiv.data.config import DataConfig, Dataset, should_stream
from diffdiv.data.images import folder_bytes
from diffdiv.data.prompts import PromptBank, encode_in_batches

N_BIG, SIZE_BIG = 2000, 64  # decoded whole: 2000 x 3 x 64 x 64 x 4 B = 98.3 MB


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png", compress_level=1)
    return folder


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("small") / "img", 40, 24)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("big") / "img", N_BIG, SIZE_BIG, seed=1)


def cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(kind="image_folder", path=str(path), image_size=kw.pop("image_size", 16), channels=3, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_equals_in_memory_and_ranks_split_the_global_batch(small_folder, workers):
    mem = Dataset(cfg(small_folder, stream=False))
    st = Dataset(cfg(small_folder, stream=True, num_workers=workers))
    assert mem.data is not None and st.data is None and st.stream is not None
    assert len(st) == len(mem) == 40 and st.sample_shape == mem.sample_shape == (3, 16, 16)
    for seed in (0, 1):
        ref = mem.batch(12, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(st.batch(12, torch.Generator().manual_seed(seed)), ref, rtol=0, atol=0)
        for ds in (mem, st):  # 3 ranks, each from its own copy of the shared generator: their slices = the batch
            parts = [ds.local_batch(12, torch.Generator().manual_seed(seed), r, 3) for r in range(3)]
            assert all(p.shape == (4, 3, 16, 16) for p in parts)
            torch.testing.assert_close(torch.cat(parts), ref, rtol=0, atol=0)
    # the generator advances identically (the next draw after a batch matches too)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mem.batch(7, g1), st.local_batch(7, g2, 1, 2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_sigma_data_of_a_stream_is_the_subset_std(small_folder):
    mem = Dataset(cfg(small_folder, stream=False))
    st = Dataset(cfg(small_folder, stream=True, num_workers=0))
    # 40 images < the 512-image subset: the estimate is the exact std of the folder
    assert st.sigma_data == pytest.approx(float(mem.data.std()), rel=1e-6)


def test_auto_streaming_threshold(small_folder):
    one = folder_bytes(1, 16, 3)
    assert one == 3 * 16 * 16 * 4
    assert not should_stream(cfg(small_folder, max_memory_mb=40 * one / 2**20), 40)  # exactly at the cap
    assert should_stream(cfg(small_folder, max_memory_mb=39 * one / 2**20), 40)
    assert not should_stream(cfg(small_folder, stream=False, max_memory_mb=1e-6), 40)


def _traced_peak(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_folder_over_the_memory_cap_streams_with_bounded_memory(big_folder):
    """2000 PNGs: loaded whole they hold ~98 MB (numpy decode buffers, traced); streamed under a 16 MB cap the
    dataset decodes one batch at a time and peak traced memory stays near one batch (16 x 49 KB)."""
    whole = folder_bytes(N_BIG, SIZE_BIG, 3)
    c = cfg(big_folder, image_size=SIZE_BIG, max_memory_mb=16, num_workers=0)
    assert whole > 16 * 2**20 and should_stream(c, N_BIG)

    held: list[Dataset] = []
    peak_mem = _traced_peak(lambda: held.append(Dataset(cfg(big_folder, image_size=SIZE_BIG, stream=False))))
    assert held[0].data.nbytes == whole
    assert peak_mem > 0.9 * whole  # the measurement sees the in-memory load (the test can fail)
    held.clear()

    def stream_epoch() -> None:
        ds = Dataset(c)
        assert ds.stream is not None and ds.data is None
        g = torch.Generator().manual_seed(0)
        for _ in range(25):  # 400 images decoded, 16 at a time
            x = ds.batch(16, g)
            assert x.shape == (16, 3, SIZE_BIG, SIZE_BIG) and float(x.abs().max()) <= 1.0

    peak_stream = _traced_peak(stream_epoch)
    batch_bytes = folder_bytes(16, SIZE_BIG, 3)
    assert peak_stream < 8 * batch_bytes, (peak_stream, batch_bytes)  # ~6 MB bound vs 98 MB whole
    assert peak_stream < 0.1 * peak_mem


def test_teacher_trains_on_a_streamed_folder(big_folder, tmp_path):
    from diffdiv.config import load_config
    from diffdiv.trainers.teacher import TeacherTrainConfig, TeacherTrainer

    c = load_config(TeacherTrainConfig, None, [
        f"output_dir={tmp_path / 'run'}", "max_steps=3", "batch_size=8", "cpu=true", "log_every=1", "log_with=null",
        "checkpoint_every=0", "eval_samples=0", "progress=false", "warmup_steps=1", "data.kind=image_folder",
        f"data.path={big_folder}", "data.image_size=16", "data.channels=3", "data.max_memory_mb=1",
        "data.num_workers=2", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
        "model.layers_per_block=1"])
    tr = TeacherTrainer(c)
    tr.train()
    assert tr.data.stream is not None and tr.data.data is None
    assert len(tr.history) == 3 and all(np.isfinite(h["model/loss"]) for h in tr.history)


# ------------------------------------------------------------------------------------------------ prompts
class Enc:
    """A deterministic encoder (prompt -> tensor of its characters' codes) that records its batch sizes."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(len(prompts))
        return torch.tensor([[float(ord(ch)) for ch in p.ljust(8)[:8]] for p in prompts])


def test_encode_in_batches_matches_one_call():
    prompts = [f"p{i}" for i in range(23)]
    enc = Enc()
    out = encode_in_batches(enc, prompts, batch_size=5)
    assert enc.calls == [5, 5, 5, 5, 3]
    torch.testing.assert_close(out, Enc()(prompts), rtol=0, atol=0)


def test_prompt_bank_encodes_on_demand_with_a_bounded_cache():
    from diffdiv.models.text2img import TextCond

    prompts = [f"prompt {i}" for i in range(100)]

    def enc_cond(ps: list[str]) -> TextCond:  # TextCond concatenates through TextCond.cat
        e = Enc()(ps)
        return TextCond(embeds=e[:, None, :].repeat(1, 3, 1), pooled=e[:, :2])

    enc = Enc()
    bank = PromptBank(prompts, enc, batch_size=4, max_cached=10)
    full = Enc()(prompts)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(100, (8,), generator=g)
        torch.testing.assert_close(bank[idx], full[idx], rtol=0, atol=0)
        assert len(bank.cache) <= 10
    assert max(enc.calls) <= 4 and bank.encoded == sum(enc.calls) < 20 * 8
    bank_c = PromptBank(prompts, enc_cond, batch_size=3, max_cached=10)
    c = bank_c[torch.tensor([5, 7, 5, 99])]
    ref = enc_cond(prompts)[torch.tensor([5, 7, 5, 99])]
    torch.testing.assert_close(c.embeds, ref.embeds, rtol=0, atol=0)
    torch.testing.assert_close(c.pooled, ref.pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_cached"):
        bank[torch.arange(11)]
