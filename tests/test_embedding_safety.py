"""Embedding files from strangers: no code runs, lying headers and NaN vectors are refused, widths must fit."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from stages.common.embedding.core import Embedding, EmbeddingError, check_embedding_fits, save_a1111_pt, save_safetensors
from stages.common.embedding.read import read_embedding, read_embedding_for_model
from stages.common.families import get_family


class CreatesFile:
    """A pickle payload: unpickling it calls open(target, "w"), which creates the file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "bare-pickle"])
def test_a_pickle_that_would_create_a_file_is_refused_and_the_file_never_appears(tmp_path, container):
    target = tmp_path / "pwned.txt"
    payload = {"name": CreatesFile(target), "string_to_param": {"*": torch.zeros(1, 768)}}
    path = tmp_path / "evil.pt"
    if container == "bare-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
        pickle.loads(path.read_bytes())  # the payload is real: a plain unpickler creates the file
        assert target.exists()
        target.unlink()
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "torch-zip")
    with pytest.raises(EmbeddingError, match=r"evil\.pt: refused, loading it would run code \(Unsupported global: GLOBAL io\.open\)"):
        read_embedding(path)
    assert not target.exists()


def _safetensors_bytes(tensors: dict[str, torch.Tensor], tmp_path) -> bytearray:
    path = tmp_path / "valid.safetensors"
    save_file(tensors, str(path))
    return bytearray(path.read_bytes())


def test_a_safetensors_header_that_lies_about_its_length_is_refused(tmp_path):
    data = _safetensors_bytes({"emb_params": torch.randn(2, 768)}, tmp_path)
    data[:8] = struct.pack("<Q", 10**12)  # claims a terabyte of header
    path = tmp_path / "lying.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(EmbeddingError, match=rf"lying\.safetensors: its header says it is {10**12} bytes long, but only {len(data) - 8} bytes follow"):
        read_embedding(path)


def _rewrite_header(data: bytearray, edit) -> bytes:
    length = struct.unpack("<Q", bytes(data[:8]))[0]
    header = json.loads(bytes(data[8 : 8 + length]))
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + length :])


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h: h["emb_params"].update(shape=[4, 768]), r"claims shape \[4, 768\] F32 \(12288 bytes\) but its offsets span 6144 bytes"),
        (lambda h: h["emb_params"].update(dtype="I64"), r"dtype 'I64'; embedding vectors are one of F16, BF16, F32, F64"),
        (lambda h: h["emb_params"].update(shape=[1, 2, 768]), r"shape \[1, 2, 768\]"),
        (lambda h: h["emb_params"].update(data_offsets=[8, 6152]), r"starts at byte 8, expected 0"),
    ],
)
def test_safetensors_headers_are_checked_before_any_tensor_is_read(tmp_path, edit, message):
    data = _safetensors_bytes({"emb_params": torch.randn(2, 768)}, tmp_path)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewrite_header(data, edit))
    with pytest.raises(EmbeddingError, match=message):
        read_embedding(path)


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    data = _safetensors_bytes({"emb_params": torch.randn(2, 768)}, tmp_path)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(EmbeddingError, match="accounts for 6144 bytes of tensor data but the file holds 6044"):
        read_embedding(path)


def test_a_model_or_lora_is_not_taken_for_an_embedding(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({f"lora_unet_block_{i}.lora_down.weight": torch.zeros(4, 4) for i in range(40)}, str(path))
    with pytest.raises(EmbeddingError, match="holds 40 tensors .*not an embedding"):
        read_embedding(path)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_nan_vectors_are_refused_on_read_and_never_written(tmp_path, fmt):
    vectors = torch.randn(2, 768)
    vectors[1, 5] = float("nan")
    path = tmp_path / f"nan.{fmt}"
    if fmt == "safetensors":
        save_file({"emb_params": vectors}, str(path))
    else:
        torch.save({"string_to_param": {"*": vectors}, "name": "nan"}, path)
    with pytest.raises(EmbeddingError, match=r"nan\.\w+: emb_params holds 1 NaN/inf values out of 1536"):
        read_embedding(path)
    writer = save_safetensors if fmt == "safetensors" else save_a1111_pt
    with pytest.raises(EmbeddingError, match="NaN/inf"):
        writer(Embedding("nan", {"emb_params": vectors}), tmp_path / f"out.{fmt}")
    assert not (tmp_path / f"out.{fmt}").exists()


def test_a_1024_wide_embedding_for_a_768_wide_model_names_both_widths_and_its_family(tmp_path):
    path = tmp_path / "sd2thing.safetensors"
    save_safetensors(Embedding("sd2thing", {"emb_params": torch.randn(2, 1024)}), path)
    with pytest.raises(EmbeddingError) as refused:
        read_embedding_for_model(path, get_family("sd1"), (768,))
    message = str(refused.value)
    assert message.startswith(f"{path}: its emb_params vectors are 1024 wide, but the model's text encoder is 768 wide (sd1 model)")
    assert "made for sd2 (" in message and "sd2-v (" in message


def test_an_sdxl_embedding_for_an_sd1_model_says_what_it_was_made_for():
    sdxl = Embedding("x", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(EmbeddingError, match=r"holds clip_l \+ clip_g \(made for sdxl .*\), but the sd1 model takes emb_params"):
        check_embedding_fits(sdxl, get_family("sd1"), (768,), "x.safetensors")
    check_embedding_fits(sdxl, get_family("sdxl"), (768, 1280), "x.safetensors")  # fits: no error


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "the file is empty"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, "a JPEG/GIF image cannot hold an embedding"),
        (b"hello, this is text", "not an embedding file"),
        (b"\x80\x02garbage", "not a readable PyTorch file"),
    ],
)
def test_files_that_are_not_embeddings_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "thing.pt"
    path.write_bytes(content)
    with pytest.raises(EmbeddingError, match=message):
        read_embedding(path)


def test_dicts_that_are_not_one_embedding_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 8), "other": torch.zeros(1, 8)}}, tmp_path / "two_terms.pt")
    with pytest.raises(EmbeddingError, match="string_to_param holds 2 terms"):
        read_embedding(tmp_path / "two_terms.pt")
    torch.save({"clip_l": torch.zeros(1, 768)}, tmp_path / "half_sdxl.pt")
    with pytest.raises(EmbeddingError, match="has clip_l but no clip_g"):
        read_embedding(tmp_path / "half_sdxl.pt")
    torch.save({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, tmp_path / "uneven.pt")
    with pytest.raises(EmbeddingError, match="different vector counts"):
        read_embedding(tmp_path / "uneven.pt")


def test_a_safetensors_header_length_starting_with_the_pickle_opcode_is_still_safetensors(tmp_path):
    """384 = 0x180: the file's first byte is 0x80, the opcode every protocol-2 pickle starts with."""
    vectors = torch.randn(1, 8)
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [1, 8], "data_offsets": [0, 32]}}).encode().ljust(384)
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", 384) + header + vectors.numpy().tobytes())
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_embedding(path).vectors["emb_params"], vectors)
