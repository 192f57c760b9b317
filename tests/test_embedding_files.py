"""Every embedding format round-trips exactly, is recognised by content, and our .pt passes AUTOMATIC1111's checks."""
from __future__ import annotations

import io
import pickle
import re
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.common.embedding.core import Embedding, save_a1111_pt, save_diffusers, save_embedding_files
from stages.tools.embedding_convert import EMBEDDING_WRITERS, write_embedding
from stages.common.embedding.png import TEXT_CHUNK_KEY, lcg_sequence, read_image_payload
from stages.common.embedding.read import open_embedding_file, read_embedding


def make_embedding(kind: str, vectors: int = 2, seed: int = 0) -> Embedding:
    generator = torch.Generator().manual_seed(seed)
    widths = {"sd1": {"emb_params": 768}, "sd2": {"emb_params": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[kind]
    tensors = {key: torch.randn(vectors, width, generator=generator) * 0.02 for key, width in widths.items()}
    return Embedding("mytok", tensors, step=120, checkpoint_hash="0123abcd", checkpoint_name="base-model")


def assert_same_vectors(read: Embedding, written: Embedding) -> None:
    assert read.vectors.keys() == written.vectors.keys()
    for key in written.vectors:
        assert read.vectors[key].dtype == torch.float32
        assert torch.equal(read.vectors[key], written.vectors[key]), key


# format, output name, whether the file keeps name/step/checkpoint
FORMATS = [
    ("safetensors", "e.safetensors", True),
    ("pt", "e.pt", True),
    ("png", "e.png", True),
]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("fmt,filename,keeps_info", FORMATS)
def test_round_trip_is_exact(tmp_path, kind, fmt, filename, keeps_info):
    embedding = make_embedding(kind)
    paths = write_embedding(embedding, fmt, tmp_path / filename)
    assert paths == [tmp_path / filename]
    read = read_embedding(paths[0])
    assert_same_vectors(read, embedding)
    if embedding.is_sdxl and fmt != "safetensors":
        # AUTOMATIC1111's SDXL dicts hold only the two tensors; the name is the file's
        assert read.name == "e"
    else:
        assert (read.name, read.step, read.checkpoint_hash, read.checkpoint_name) == ("mytok", 120, "0123abcd", "base-model")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_learned_embeds_round_trip(tmp_path, kind, suffix):
    embedding = make_embedding(kind, vectors=3)
    paths = save_diffusers(embedding, tmp_path / f"learned_embeds{suffix}")
    expected = ["learned_embeds", "learned_embeds_2"] if kind == "sdxl" else ["learned_embeds"]
    assert [p.name for p in paths] == [stem + suffix for stem in expected]
    for key, path in zip(embedding.encoder_keys, paths):
        file = open_embedding_file(path)
        assert "diffusers learned_embeds" in file.format
        assert file.embedding.name == "mytok"  # the token is the key
        assert torch.equal(file.embedding.vectors["emb_params"], embedding.vectors[key])


def test_every_writer_format_is_offered_by_the_cli():
    from stages.tools.cli import EMBEDDING_FORMATS

    assert set(EMBEDDING_FORMATS) == set(EMBEDDING_WRITERS)


def test_png_data_in_the_pixels_alone_round_trips_also_as_lossless_webp(tmp_path):
    embedding = make_embedding("sd1", vectors=4)
    png = write_embedding(embedding, "png", tmp_path / "e.png")[0]
    with Image.open(png) as image:
        assert TEXT_CHUNK_KEY in image.text
        pixels_only = image.convert("RGB")
    pixels_only.save(tmp_path / "no_chunk.png")  # re-saved: the text chunk is gone
    pixels_only.save(tmp_path / "e.webp", lossless=True)
    for path in (tmp_path / "no_chunk.png", tmp_path / "e.webp"):
        payload, origin = read_image_payload(path)
        assert origin == "data in the pixels"
        assert payload["name"] == "mytok" and payload["step"] == 120
        file = open_embedding_file(path)
        assert_same_vectors(file.embedding, embedding)


def test_png_pixel_layout_matches_automatic1111(tmp_path):
    """Data blocks left and right of the picture, each behind one black column, masked by A1111's LCG."""
    # the first values of AUTOMATIC1111's lcg() (its image_embedding.py self-test reference)
    assert lcg_sequence(10).tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79]
    embedding = make_embedding("sd1")
    card = Image.new("RGB", (64, 64), (90, 120, 150))
    from stages.common.embedding.png import save_png_embedding

    path = save_png_embedding(embedding, tmp_path / "e.png", image=card)[0]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    nibble_sums = (pixels & 0x0F).sum(axis=(0, 2))
    separators = np.flatnonzero(nibble_sums == 0)
    columns = (pixels.shape[1] - 64 - 2) // 2
    assert separators.tolist() == [columns, columns + 65]
    assert (pixels[:, columns + 1 : columns + 65] == card).all()  # the picture itself is untouched


def test_files_are_recognised_by_content_not_extension(tmp_path):
    embedding = make_embedding("sd1")
    written = [
        *write_embedding(embedding, "safetensors", tmp_path / "a.safetensors"),
        *write_embedding(embedding, "pt", tmp_path / "b.pt"),
        *write_embedding(embedding, "diffusers", tmp_path / "c.bin"),
        *write_embedding(embedding, "png", tmp_path / "d.png"),
    ]
    formats = []
    for path in written:
        disguised = tmp_path / f"{path.stem}-renamed.dat"
        shutil.copy(path, disguised)
        file = open_embedding_file(disguised)
        assert_same_vectors(file.embedding, embedding)
        formats.append(file.format)
    assert formats == [
        "emb_params in a safetensors file",
        "AUTOMATIC1111 string_to_param in a legacy torch pickle",
        "diffusers learned_embeds {token: tensor} in a legacy torch pickle",
        "AUTOMATIC1111 string_to_param in an AUTOMATIC1111 image embedding (sd-ti-embedding text chunk)",
    ]


def test_reads_files_other_tools_write(tmp_path):
    vec = torch.randn(2, 768)
    # diffusers' single-vector learned_embeds.bin: {token: [width]}, torch's default zip format
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")
    # the original textual-inversion code pickled an nn.ParameterDict (zip format)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)})},
               tmp_path / "old.pt")
    # an SDXL .pt and an fp16 safetensors from other trainers
    torch.save({"clip_g": torch.randn(2, 1280), "clip_l": vec}, tmp_path / "sdxl.pt")
    from safetensors.torch import save_file

    save_file({"emb_params": vec.half()}, str(tmp_path / "half.safetensors"))

    diffusers_file = open_embedding_file(tmp_path / "learned_embeds.bin")
    assert diffusers_file.embedding.name == "<cat-toy>" and "torch zip pickle" in diffusers_file.format
    assert torch.equal(diffusers_file.embedding.vectors["emb_params"], vec[:1])
    assert torch.equal(read_embedding(tmp_path / "old.pt").vectors["emb_params"], vec)
    sdxl = read_embedding(tmp_path / "sdxl.pt")
    assert sdxl.widths == (768, 1280) and torch.equal(sdxl.vectors["clip_l"], vec)
    assert torch.equal(read_embedding(tmp_path / "half.safetensors").vectors["emb_params"], vec.half().float())


def test_train_stage_interface_still_writes_safetensors_and_pt(tmp_path):
    tensor = torch.randn(2, 32)
    embedding = Embedding("demotok", {"emb_params": tensor}, step=7)
    paths = save_embedding_files(embedding, tmp_path, "demotok-7")
    assert [p.name for p in paths] == ["demotok-7.safetensors", "demotok-7.pt"]
    for path in paths:
        assert torch.equal(read_embedding(path).vectors["emb_params"], tensor)
    assert not list(tmp_path.glob(".*partial"))  # atomic writes leave no temporaries


# ----------------------------------------------------------------- AUTOMATIC1111's safe unpickler rules

# modules/safe.py: the globals its RestrictedUnpickler allows, and the entries allowed in a zip archive
A1111_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("_codecs", "encode"), ("__builtin__", "set"),
}
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|(data\.pkl))$")


class A1111Refused(Exception):
    pass


class _Placeholder(dict):
    """Stands in for any allowed global: the check is about names, nothing real gets built."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_ALLOWED_GLOBALS:
            raise A1111Refused(f"global '{module}/{name}' is forbidden")
        return OrderedDict if (module, name) == ("collections", "OrderedDict") else _Placeholder

    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise A1111Refused(f"persistent id {saved_id[0]!r}")
        return _Placeholder()


def a1111_check_pt(path: Path) -> None:
    """AUTOMATIC1111's check_pt: zip archives by entry names + data.pkl, legacy files as five pickles."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not A1111_ZIP_NAMES.match(name):
                    raise A1111Refused(f"bad file inside {path}: {name}")
            data_pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            with archive.open(data_pkl[0]) as handle:
                A1111Unpickler(handle).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            unpickler = A1111Unpickler(handle)
            for _ in range(5):  # magic number, protocol, sys info, the object, storage keys
                unpickler.load()


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_our_pickles_pass_automatic1111s_allow_list(tmp_path, kind):
    embedding = make_embedding(kind)
    a1111_check_pt(save_a1111_pt(embedding, tmp_path / "e.pt")[0])
    for path in save_diffusers(embedding, tmp_path / "learned_embeds.bin"):  # A1111 loads .bin the same way
        a1111_check_pt(path)


def test_the_allow_list_check_refuses_what_automatic1111_refuses(tmp_path):
    # recent torch's zip archives carry .format_version / .storage_alignment entries
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}}, tmp_path / "zip.pt")
    with pytest.raises(A1111Refused, match=r"bad file inside .*\.(format_version|storage_alignment|data/serialization_id)"):
        a1111_check_pt(tmp_path / "zip.pt")
    torch.save({"x": io.BytesIO(b"")}, tmp_path / "code.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(A1111Refused, match="forbidden"):
        a1111_check_pt(tmp_path / "code.pt")


def test_our_pickles_load_with_torch_weights_only(tmp_path):
    """ComfyUI and diffusers load .pt/.bin with torch.load(weights_only=True)."""
    embedding = make_embedding("sd1")
    data = torch.load(save_a1111_pt(embedding, tmp_path / "e.pt")[0], weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert torch.equal(data["string_to_param"]["*"], embedding.vectors["emb_params"])
    assert not zipfile.is_zipfile(tmp_path / "e.pt")
