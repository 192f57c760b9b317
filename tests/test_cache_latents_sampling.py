"""What training gets from the cache: AUTOMATIC1111's three latent sampling methods, and never a NaN."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from stages.cache_latents.encode import NonFiniteLatentsError, cache_latents
from stages.cache_latents.settings import CacheSettings
from stages.common.latents import LatentExample, sample_latent
from test_cache_latents import SharedLog, direct, vae, write_preprocessed  # noqa: F401 (vae is a fixture)


def cached_examples(folder) -> list[LatentExample]:
    manifest = pd.read_csv(folder / "manifest.csv")
    return [LatentExample(row.image, **load_file(str(folder / row.latent_file)), caption="") for row in manifest.itertuples()]


@pytest.fixture
def examples(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64), "b.png": (64, 64)})
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CacheSettings.from_schema(device="cpu"))
    return pre, cached_examples(tmp_path / "lat")


def test_deterministic_is_the_mean_of_a_direct_encode(vae, examples):
    pre, (first, _) = examples
    generator = torch.Generator().manual_seed(0)
    taken = [sample_latent(first, "deterministic", generator) for _ in range(3)]
    assert all(torch.equal(t, taken[0]) for t in taken)
    assert torch.allclose(taken[0], direct(vae, pre / "a.png").mode()[0], atol=1e-5)


def test_random_is_a_fresh_seeded_sample_of_the_vae_distribution(vae, examples):
    pre, (first, _) = examples
    generator = torch.Generator().manual_seed(7)
    one, two = sample_latent(first, "random", generator), sample_latent(first, "random", generator)
    assert not torch.allclose(one, two)  # fresh noise each step
    again = sample_latent(first, "random", torch.Generator().manual_seed(7))
    assert torch.equal(one, again)  # the seed reproduces it
    # the same draw diffusers' latent_dist.sample() makes: mean + exp(logvar / 2) * eps
    reference = direct(vae, pre / "a.png").sample(generator=torch.Generator().manual_seed(7))[0]
    assert torch.allclose(one, reference, atol=1e-5)


def test_once_keeps_one_sample_per_image(examples):
    _, (first, second) = examples
    drawn = torch.Generator().manual_seed(3)  # as the trainer does: one draw per image when the run starts
    fixed = [sample_latent(e, "random", drawn) for e in (first, second)]
    steps = torch.Generator().manual_seed(0)
    for _ in range(3):
        assert torch.equal(sample_latent(first, "once", steps, fixed[0]), fixed[0])
        assert torch.equal(sample_latent(second, "once", steps, fixed[1]), fixed[1])
    assert not torch.allclose(fixed[0], first.mean)  # a sample, not the mean
    assert not torch.allclose(fixed[0] - first.mean, fixed[1] - second.mean)  # its own noise per image


def write_bright(path, seed=0) -> None:
    """A textured picture in light tones (pixels 200-255), the kind OverflowingVAE overflows on."""
    coarse = np.random.default_rng(seed).integers(200, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((64, 64), Image.BILINEAR).save(path)


class OverflowingVAE(torch.nn.Module):
    """Stands in for SDXL's VAE in fp16: bright images give NaN below fp32 (in every dtype with always=True)."""

    def __init__(self, inner: torch.nn.Module, always: bool = False):
        super().__init__()
        self.inner, self.always = inner, always
        self.calls = SharedLog()  # (dtype, images) per call

    def encode(self, pixels):
        dtype = next(self.parameters()).dtype
        self.calls.append((dtype, len(pixels)))
        out = self.inner.encode(pixels).latent_dist
        bright = (pixels.float().flatten(1).mean(1) > 0.5)[:, None, None, None]
        overflows = self.always or dtype != torch.float32
        mean = torch.where(bright & overflows, torch.nan, out.mean)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=out.logvar))


def test_an_fp16_overflow_is_encoded_again_in_fp32_and_only_that_image(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"dark.png": (64, 64), "bright.png": (64, 64), "other.png": (64, 64)})
    write_bright(pre / "bright.png")
    overflowing = OverflowingVAE(vae)
    summary = cache_latents(pre, tmp_path / "lat", tmp_path / "store", overflowing, "v",
                            settings=CacheSettings.from_schema(device="cpu", dtype="fp16", batch_size=4))
    assert (summary.encoded, summary.retried_fp32) == (3, 1)
    assert overflowing.calls == [(torch.float16, 3), (torch.float32, 1)]  # only the overflowing image again
    for row in pd.read_csv(tmp_path / "lat" / "manifest.csv").itertuples():
        assert row.latent_file.endswith("-fp16.safetensors")  # keyed by the dtype asked for
        with safe_open(str(tmp_path / "lat" / row.latent_file), framework="pt") as entry:
            mean, encoded_dtype = entry.get_tensor("mean"), entry.metadata()["encoded_dtype"]
        assert torch.isfinite(mean).all()
        assert encoded_dtype == ("fp32" if row.image == "bright.png" else "fp16")
        tolerance = 1e-4 if row.image == "bright.png" else 0.05  # fp32 (up to the memory layout's rounding) or fp16
        assert torch.allclose(mean, direct(vae, pre / row.image).mean[0], atol=tolerance)


def test_a_nan_that_survives_fp32_is_reported_by_name_and_never_cached(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"dark.png": (64, 64), "bright.png": (64, 64), "other.png": (64, 64)})
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CacheSettings.from_schema(device="cpu", dtype="fp16"))
    write_bright(pre / "bright.png")
    broken = OverflowingVAE(vae, always=True)
    with pytest.raises(NonFiniteLatentsError, match=r"NaN/inf latents for 1 image\(s\) even in fp32.*: bright\.png\."):
        cache_latents(pre, tmp_path / "lat", tmp_path / "store", broken, "v", settings=CacheSettings.from_schema(device="cpu", dtype="fp16"))
    assert [dtype for dtype, _ in broken.calls] == [torch.float16, torch.float32]  # retried before giving up
    assert not (tmp_path / "lat" / "manifest.csv").exists()  # training cannot read a stale list
    assert all(torch.isfinite(load_file(str(p))["mean"]).all() for p in (tmp_path / "store").rglob("*.safetensors"))
    assert len(list((tmp_path / "store").rglob("*.safetensors"))) == 3  # the three earlier entries, nothing for the new bright.png

    Image.new("RGB", (64, 64), (20, 20, 20)).save(pre / "bright.png")  # the user replaces the image
    fixed = cache_latents(pre, tmp_path / "lat", tmp_path / "store", broken, "v", settings=CacheSettings.from_schema(device="cpu", dtype="fp16"))
    assert (fixed.encoded, fixed.reused) == (1, 2)
    assert len(pd.read_csv(tmp_path / "lat" / "manifest.csv")) == 3


def test_training_examples_read_their_latents_from_the_cache_file_instead_of_holding_them(demo_prepared):
    from stages.common.latents import load_examples, once_sample

    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    first = examples[0]
    assert first._mean is None and first._logvar is None  # nothing held: memory does not grow with the dataset
    stored = load_file(str(first.latent_file))
    assert torch.equal(first.mean, stored["mean"]) and torch.equal(first.logvar, stored["logvar"])
    # `once` without storing: the same sample for an image at every step (and after a resume), another per image
    assert torch.equal(once_sample(first, 0, seed=2), once_sample(first, 0, seed=2))
    assert not torch.allclose(once_sample(first, 0, seed=2), first.mean)
    assert not torch.allclose(once_sample(first, 0, seed=2) - first.mean, once_sample(examples[1], 1, seed=2) - examples[1].mean)


def test_a_latent_file_that_vanishes_during_training_is_named(demo_prepared, tmp_path):
    import shutil

    from stages.common.latents import LatentExample

    copy = tmp_path / "entry.safetensors"
    shutil.copy(load_examples_first_file(demo_prepared), copy)
    example = LatentExample("a.png", caption="", latent_file=copy)
    mean, logvar = example.distribution()
    assert torch.equal(mean, example.mean) and torch.equal(logvar, example.logvar)
    copy.unlink()
    with pytest.raises(FileNotFoundError, match=r"entry\.safetensors \(the latents of a\.png\) can no longer be read"):
        example.distribution()


def load_examples_first_file(demo_prepared):
    from stages.common.latents import load_examples

    return load_examples(demo_prepared / "latents", demo_prepared / "caption")[0].latent_file
