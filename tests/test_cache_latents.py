"""cache_latents: cached latents are the VAE's, keyed by content, reused across runs, streamed batch by batch."""
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from stages.cache_latents.__main__ import build_parser, main
from stages.cache_latents.encode import cache_latents, image_to_tensor
from stages.cache_latents.encoder import vae_fingerprint
from stages.cache_latents.settings import CacheSettings
from stages.common.stage_cli import run_stage

CPU = CacheSettings.from_schema(device="cpu")


@pytest.fixture(scope="module")
def vae():
    from stages.common.models import load_model

    return load_model("builtin:tiny-sd15").vae


class SharedLog(list):
    """A call log that the encoder's copies of a test VAE share with the test."""

    def __deepcopy__(self, memo):
        return self


class CountingVAE(torch.nn.Module):
    """The real VAE, recording each call's batch and how many store entries existed when it came."""

    def __init__(self, inner: torch.nn.Module, store: Path | None = None):
        super().__init__()
        self.inner, self.store = inner, store
        self.batches = SharedLog()
        self.entries_before = SharedLog()

    def encode(self, pixels):
        self.batches.append(len(pixels))
        if self.store is not None:
            self.entries_before.append(len(list(self.store.rglob("*.safetensors"))))
        return self.inner.encode(pixels)


def write_image(folder: Path, name: str, size=(64, 64), seed=0) -> None:
    """A smooth random picture (neighbouring pixels alike, as in photos) that no other seed repeats."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.BILINEAR).save(folder / name)


def write_preprocessed(folder: Path, sizes: dict[str, tuple[int, int]], seed=0) -> Path:
    """A preprocess folder: the PNGs plus manifest.csv as the preprocess stage writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, size) in enumerate(sizes.items()):
        if not (folder / name).exists():
            write_image(folder, name, size, seed + index)
    rows = [{"output": name, "out_width": w, "out_height": h} for name, (w, h) in sizes.items()]
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def direct(vae, path: Path, flip=False):
    with torch.no_grad():
        return vae.encode(image_to_tensor(path, flip)[None]).latent_dist


def test_cached_latents_equal_a_direct_vae_encode(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {f"{i}.png": (64, 64) for i in range(5)})
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CacheSettings.from_schema(device="cpu", batch_size=2))
    manifest = pd.read_csv(tmp_path / "lat" / "manifest.csv")
    assert list(manifest.image) == [f"{i}.png" for i in range(5)]
    for row in manifest.itertuples():
        cached = load_file(str(tmp_path / "lat" / row.latent_file))
        reference = direct(vae, pre / row.image)
        assert cached["mean"].shape == (4, 8, 8) and cached["mean"].dtype == torch.float32
        assert torch.allclose(cached["mean"], reference.mean[0], atol=1e-5)
        assert torch.allclose(cached["logvar"], reference.logvar[0], atol=1e-5)


def test_flipped_copies_are_the_mirrored_image_encoded(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64)})
    summary = cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", flip=True, settings=CPU)
    manifest = pd.read_csv(tmp_path / "lat" / "manifest.csv")
    assert summary.encoded == 2 and list(manifest.flip) == [False, True] and list(manifest.image) == ["a.png"] * 2
    plain, mirrored = (load_file(str(tmp_path / "lat" / f))["mean"] for f in manifest.latent_file)
    assert torch.allclose(mirrored, direct(vae, pre / "a.png", flip=True).mean[0], atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-2)


def test_adding_one_image_to_fifty_encodes_exactly_one(vae, tmp_path):
    store = tmp_path / "store"
    counting = CountingVAE(vae, store)
    sizes = {f"img{i:02d}.png": (64, 64) for i in range(50)}
    pre = write_preprocessed(tmp_path / "pre", sizes)
    first = cache_latents(pre, tmp_path / "lat", store, counting, "v", settings=CacheSettings.from_schema(device="cpu", batch_size=8))
    assert (first.encoded, first.reused, sum(counting.batches)) == (50, 0, 50)
    assert max(counting.batches) == 8  # streamed in batches, never the whole set at once
    assert counting.entries_before == [8 * i for i in range(len(counting.batches))]  # each batch written before the next is read
    counting.batches.clear()
    write_preprocessed(pre, dict(sizes, **{"new.png": (64, 64)}), seed=100)
    added = cache_latents(pre, tmp_path / "lat", store, counting, "v", settings=CPU)
    assert (added.encoded, added.reused, counting.batches) == (1, 50, [1])
    assert len(pd.read_csv(tmp_path / "lat" / "manifest.csv")) == 51


def test_a_changed_image_or_size_recomputes_only_it_and_removed_images_leave_the_manifest(vae, tmp_path):
    store = tmp_path / "store"
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 64)})
    cache_latents(pre, tmp_path / "lat", store, vae, "v", settings=CPU)
    write_image(pre, "a.png", seed=42)  # new content, same name
    write_image(pre, "b.png", size=(64, 128), seed=1)  # same picture at another bucket size
    changed = cache_latents(pre, tmp_path / "lat", store, vae, "v", settings=CPU)
    assert (changed.encoded, changed.reused) == (2, 1)

    write_preprocessed(pre, {"a.png": (64, 64), "b.png": (64, 128)})  # c.png removed
    removed = cache_latents(pre, tmp_path / "lat", store, vae, "v", settings=CPU)
    manifest = pd.read_csv(tmp_path / "lat" / "manifest.csv")
    assert (removed.encoded, list(manifest.image)) == (0, ["a.png", "b.png"])
    assert manifest.iloc[1].latent_file.endswith("-64x128-fp32.safetensors")
    assert len(list(store.rglob("*.safetensors"))) == 5  # old entries stay for a switch back...

    pruned = cache_latents(pre, tmp_path / "lat", store, vae, "v", settings=CacheSettings.from_schema(device="cpu", prune=True))
    assert pruned.pruned_files == 3  # ...until prune deletes what the manifest does not use
    assert sorted(p.name for p in store.rglob("*.safetensors")) == sorted(Path(f).name for f in manifest.latent_file)


def test_switching_to_another_vae_recomputes_all_and_switching_back_reuses_all(vae, tmp_path):
    other = copy.deepcopy(vae)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.5)  # a VAE with other weights
    assert vae_fingerprint(copy.deepcopy(vae)) == vae_fingerprint(vae) != vae_fingerprint(other)
    pre = write_preprocessed(tmp_path / "pre", {f"{i}.png": (64, 64) for i in range(4)})
    runs = [cache_latents(pre, tmp_path / "lat", tmp_path / "store", v, f"vae-{vae_fingerprint(v)}", settings=CPU)
            for v in (vae, other, vae)]
    assert [(r.encoded, r.reused) for r in runs] == [(4, 0), (4, 0), (0, 4)]
    assert len({p.parent for p in (tmp_path / "store").rglob("*.safetensors")}) == 2
    other_mean = load_file(str(next((tmp_path / "store" / f"vae-{vae_fingerprint(other)}").glob("*.safetensors"))))["mean"]
    assert not torch.allclose(other_mean, torch.zeros_like(other_mean))


def test_dtype_is_part_of_the_key(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64), "b.png": (64, 64)})
    fp32 = cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    bf16 = cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CacheSettings.from_schema(device="cpu", dtype="bf16"))
    assert (fp32.encoded, bf16.encoded, bf16.reused) == (2, 2, 0)
    row = pd.read_csv(tmp_path / "lat" / "manifest.csv").iloc[0]
    assert row.latent_file.endswith("-64x64-bf16.safetensors")
    cached = load_file(str(tmp_path / "lat" / row.latent_file))["mean"]
    assert cached.dtype == torch.float32  # stored as fp32 whatever the compute dtype
    assert torch.allclose(cached, direct(vae, pre / "a.png").mean[0], atol=0.1)


def test_buckets_encode_each_image_at_its_own_size_without_mixing_sizes(vae, tmp_path):
    sizes = {"wide.png": (128, 64), "square.png": (64, 64), "tall.png": (64, 128), "square2.png": (64, 64), "wide2.png": (128, 64)}
    pre = write_preprocessed(tmp_path / "pre", sizes)
    counting = CountingVAE(vae)
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", counting, "v", settings=CacheSettings.from_schema(device="cpu", batch_size=4))
    assert sorted(counting.batches) == [1, 2, 2]  # one call per size
    for row in pd.read_csv(tmp_path / "lat" / "manifest.csv").itertuples():
        mean = load_file(str(tmp_path / "lat" / row.latent_file))["mean"]
        assert (row.width, row.height) == sizes[row.image] and mean.shape == (4, row.height // 8, row.width // 8)
        assert torch.allclose(mean, direct(vae, pre / row.image).mean[0], atol=1e-5)


def test_tiling_encodes_large_images_in_tiles_under_their_own_key(vae, tmp_path):
    tiled_vae = copy.deepcopy(vae)
    tiled_vae.tile_sample_min_size, tiled_vae.tile_latent_min_size = 32, 4  # make 64 px "large" for this VAE
    pre = write_preprocessed(tmp_path / "pre", {"big.png": (64, 64), "small.png": (32, 32)})
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", tiled_vae, "v", settings=CacheSettings.from_schema(device="cpu", tiling=True))
    big, small = pd.read_csv(tmp_path / "lat" / "manifest.csv").latent_file
    assert big.endswith("-64x64-fp32-tiled.safetensors") and small.endswith("-32x32-fp32.safetensors")
    reference = copy.deepcopy(tiled_vae)
    reference.enable_tiling()
    cached = load_file(str(tmp_path / "lat" / big))["mean"]
    assert torch.allclose(cached, direct(reference, pre / "big.png").mean[0], atol=1e-5)
    assert not torch.allclose(cached, direct(vae, pre / "big.png").mean[0], atol=1e-4)  # tiles blend at the seams


def test_a_damaged_entry_is_encoded_again(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64), "b.png": (64, 64)})
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    row = pd.read_csv(tmp_path / "lat" / "manifest.csv").iloc[0]
    entry = tmp_path / "lat" / row.latent_file
    entry.write_bytes(entry.read_bytes()[:40])  # e.g. a copy cut short by a full disk
    again = cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    assert (again.encoded, again.reused) == (1, 1)
    with safe_open(str(entry), framework="pt") as readable:
        assert readable.metadata()["image_sha256"] == row.image_sha256
        assert torch.allclose(readable.get_tensor("mean"), direct(vae, pre / "a.png").mean[0], atol=1e-5)


def test_bad_inputs_get_errors_naming_the_file(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64), "gone.png": (64, 64)})
    (pre / "gone.png").unlink()
    with pytest.raises(FileNotFoundError, match="gone.png.*rerun the preprocess stage"):
        cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    write_image(pre, "gone.png", size=(60, 64))
    with pytest.raises(ValueError, match="gone.png: 60x64 is not a multiple of 8"):
        cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    with pytest.raises(FileNotFoundError, match="run the preprocess stage first"):
        cache_latents(tmp_path / "nowhere", tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)


def test_cli_prints_throughput_and_cache_hits_and_refuses_bad_settings(tmp_path, capsys):
    write_preprocessed(tmp_path / "pre", {f"{i}.png": (64, 64) for i in range(8)})
    paths = ["--preprocessed", str(tmp_path / "pre"), "--out", str(tmp_path / "lat"), "--store", str(tmp_path / "store")]
    settings = '{"model": {"path": "builtin:tiny-sd15"}, "cache_latents": {"batch_size": 3, "device": "cpu"}}'
    threads = torch.get_num_threads()
    try:
        assert run_stage(main, build_parser(), ["--settings", settings, "--no-flip", "--threads", "1", *paths]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert run_stage(main, build_parser(), ["--settings", settings, "--flip", *paths]) == 0
    first, second = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache_latents:")]
    assert "8 latents: 8 encoded in" in first and "images/s" in first and "0 reused from the cache" in first
    assert "16 latents: 8 encoded" in second and "8 reused from the cache" in second

    bad = '{"model": {"path": "builtin:tiny-sd15"}, "cache_latents": {"dtype": "fp8"}}'
    assert run_stage(main, build_parser(), ["--settings", bad, *paths]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["python -m stages.cache_latents: error: --settings: cache_latents.dtype: 'fp8' is not allowed; choose one of: auto, fp32, fp16, bf16"]
    assert run_stage(main, build_parser(), ["--settings", '{"path": "my.safetensors"}', *paths]) == 1  # a bare model section
    assert "found path; give a JSON object with some of these config sections: out_dir, model, cache_latents" in capsys.readouterr().err
