import shutil

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

from stages.cache_latents.encode import cache_latents, image_to_tensor


def test_cached_latents_equal_a_direct_vae_encode(demo_prepared, tiny_bundle):
    manifest = pd.read_csv(demo_prepared / "latents" / "manifest.csv")
    row = manifest.iloc[0]
    cached = load_file(str(demo_prepared / "latents" / row.latent_file))
    with torch.no_grad():
        direct = tiny_bundle.vae.encode(image_to_tensor(demo_prepared / "preprocess" / row.image, False)[None]).latent_dist
    assert torch.allclose(cached["mean"], direct.mean[0], atol=1e-5)
    assert torch.allclose(cached["logvar"], direct.logvar[0], atol=1e-5)
    assert cached["mean"].shape == (4, 8, 8)


def test_only_new_images_are_encoded(demo_prepared, tiny_bundle, tmp_path):
    preprocessed = tmp_path / "preprocess"
    shutil.copytree(demo_prepared / "preprocess", preprocessed)
    store = tmp_path / "store"
    first = cache_latents(preprocessed, tmp_path / "latents", store, tiny_bundle.vae, tiny_bundle.identity)
    again = cache_latents(preprocessed, tmp_path / "latents", store, tiny_bundle.vae, tiny_bundle.identity)
    assert (first.encoded, again.encoded, again.reused) == (8, 0, 8)
    manifest = pd.read_csv(preprocessed / "manifest.csv")
    extra = manifest.iloc[[0]].assign(output="new.png", caption="")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(preprocessed / "new.png")
    pd.concat([manifest, extra]).to_csv(preprocessed / "manifest.csv", index=False)
    added = cache_latents(preprocessed, tmp_path / "latents", store, tiny_bundle.vae, tiny_bundle.identity, flip=False)
    assert (added.encoded, added.reused) == (1, 8)
    other_vae = cache_latents(preprocessed, tmp_path / "latents", store, tiny_bundle.vae, "another-vae")
    assert other_vae.encoded == 9
