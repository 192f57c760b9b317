"""`tiflow inspect` and `tiflow convert`: what users see, and the exit status scripts rely on."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.tools.cli import main
from stages.common.embedding.core import Embedding, save_a1111_pt, save_safetensors
from stages.common.embedding.read import open_embedding_file, read_embedding


def sd_embedding(width: int = 768) -> Embedding:
    vectors = torch.tensor([[3.0, 4.0] + [0.0] * (width - 2), [0.0] * (width - 1) + [2.0]])  # norms 5 and 2
    return Embedding("mytok", {"emb_params": vectors}, step=300, checkpoint_hash="abcd1234", checkpoint_name="v1-5")


def sdxl_embedding() -> Embedding:
    return Embedding("xltok", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, step=5)


def test_inspect_describes_a_usable_embedding(tmp_path, capsys):
    path = save_a1111_pt(sd_embedding(), tmp_path / "mytok.pt")[0]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"file:       {path}" in out
    assert "format:     AUTOMATIC1111 string_to_param in a legacy torch pickle" in out
    assert "name:       mytok" in out and "vectors:    2" in out and "step:       300" in out
    assert "width:      emb_params 768" in out
    assert "family:     sd1 (Stable Diffusion 1.x (CLIP ViT-L/14))" in out
    assert "checkpoint: v1-5 [abcd1234]" in out
    assert "norms:      emb_params: 5 2" in out


def test_inspect_sdxl_shows_both_encoders(tmp_path, capsys):
    path = save_safetensors(sdxl_embedding(), tmp_path / "xl.safetensors")[0]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:     SDXL clip_l + clip_g in a safetensors file" in out
    assert "width:      clip_l 768, clip_g 1280" in out and "family:     sdxl (" in out
    assert f"norms:      clip_l: {768 ** 0.5:.4g} {768 ** 0.5:.4g}" in out


class _RunsCode:
    def __reduce__(self):
        return (print, ("ran",))


def _refused_files(tmp_path: Path) -> dict[str, Path]:
    nan = tmp_path / "nan.safetensors"
    save_file({"emb_params": torch.full((1, 768), float("nan"))}, str(nan))
    lying = tmp_path / "lying.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(lying))
    lying.write_bytes((10**9).to_bytes(8, "little") + lying.read_bytes()[8:])
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps({"string_to_param": _RunsCode()}, protocol=2))
    return {"NaN/inf values": nan, "header says it is 1000000000 bytes long": lying, "loading it would run code": code}


def test_inspect_refuses_with_one_line_and_status_1(tmp_path, capsys):
    for reason, path in _refused_files(tmp_path).items():
        assert main(["inspect", str(path)]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and "ran" not in captured.out
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tiflow inspect: error: {path}: ") and reason in lines[0]


def test_a_refused_file_gets_exactly_the_reason(tmp_path, capsys):
    path = _refused_files(tmp_path)["NaN/inf values"]
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tiflow inspect: error: {path}: emb_params holds 768 NaN/inf values out of 768; the training that made it diverged. "
        "Use an earlier snapshot (steps/) or retrain with a lower learning rate"
    ]


def test_inspect_with_a_model_checks_the_width(tmp_path, capsys):
    wide = save_safetensors(sd_embedding(768), tmp_path / "wide.safetensors")[0]
    assert main(["inspect", str(wide), "--model", "builtin:tiny-sd15"]) == 1
    err = capsys.readouterr().err
    assert "its emb_params vectors are 768 wide, but the model's text encoder is 32 wide (sd1 model)" in err
    assert "made for sd1 (" in err
    fitting = save_safetensors(sd_embedding(32), tmp_path / "fits.safetensors")[0]
    assert main(["inspect", str(fitting), "--model", "builtin:tiny-sd15"]) == 0
    assert "fits:       builtin:tiny-sd15 (sd1, text width 32)" in capsys.readouterr().out


@pytest.mark.parametrize("to,out_name", [("safetensors", "o.safetensors"), ("pt", "o.pt"), ("diffusers", "o.bin"), ("png", "o.png")])
def test_convert_writes_a_file_that_reads_back_identical(tmp_path, capsys, to, out_name):
    source = save_a1111_pt(sd_embedding(), tmp_path / "mytok.pt")[0]
    assert main(["convert", str(source), "--to", to, "-o", str(tmp_path / out_name)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / out_name}"
    converted = read_embedding(tmp_path / out_name)
    assert converted.name == "mytok"
    assert torch.equal(converted.vectors["emb_params"], sd_embedding().vectors["emb_params"])


def test_convert_sdxl_to_diffusers_writes_one_file_per_text_encoder(tmp_path, capsys):
    embedding = sdxl_embedding()
    embedding.vectors["clip_g"] = embedding.vectors["clip_g"] * 2
    source = save_safetensors(embedding, tmp_path / "xl.safetensors")[0]
    out = tmp_path / "learned_embeds.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(out)]) == 0
    second = tmp_path / "learned_embeds_2.safetensors"
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}", f"wrote {second}"]
    for path, key in ((out, "clip_l"), (second, "clip_g")):
        file = open_embedding_file(path)
        assert file.embedding.name == "xltok"
        assert torch.equal(file.embedding.vectors["emb_params"], embedding.vectors[key])


def test_convert_refuses_unsafe_input_and_writes_nothing(tmp_path, capsys):
    for reason, path in _refused_files(tmp_path).items():
        out = tmp_path / f"{path.stem}-out.safetensors"
        assert main(["convert", str(path), "--to", "safetensors", "-o", str(out)]) == 1
        assert reason in capsys.readouterr().err
        assert not out.exists()


def test_inspect_names_an_apt_pair_from_either_side(tmp_path, capsys):
    save_safetensors(Embedding("mychar", {"emb_params": torch.randn(3, 768)}, step=40), tmp_path / "mychar.safetensors")
    save_safetensors(Embedding("mychar-neg", {"emb_params": torch.randn(6, 768)}, step=40), tmp_path / "mychar-neg.safetensors")
    assert main(["inspect", str(tmp_path / "mychar.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "this is the positive embedding; its partner is mychar-neg.safetensors (6 vectors, step 40)" in shown
    assert "write mychar in the prompt and mychar-neg in the negative prompt" in shown
    assert main(["inspect", str(tmp_path / "mychar-neg.safetensors")]) == 0
    assert "this is the negative embedding; its partner is mychar.safetensors (3 vectors" in capsys.readouterr().out
    (tmp_path / "mychar-neg.safetensors").unlink()
    assert main(["inspect", str(tmp_path / "mychar.safetensors")]) == 0
    assert "APT pair" not in capsys.readouterr().out  # a plain embedding says nothing of pairs
