"""Each stage by hand (python -m stages.<name> --config) and the tiflow console script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_workflow import TINY

STAGES = ["preprocess", "caption", "cache_latents", "train", "evaluate"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage, tmp_path):
    result = run("-m", f"stages.{stage}", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--config" in result.stdout and "--settings" in result.stdout


def test_stages_run_by_hand_from_config_yaml(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    for stage in STAGES:
        extra = ["--run", "demotok"] if stage in ("train", "evaluate") else []
        result = run("-m", f"stages.{stage}", *extra, cwd=tmp_path)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
        if stage == "train":
            assert "2 of 8 latents held out for validation" in result.stdout  # runs.demotok.validation_split: 0.25
    assert (tmp_path / "out/train/demotok/demotok.safetensors").is_file()
    assert (tmp_path / "out/evaluate/demotok/grid.png").is_file()


def test_a_refused_input_gives_one_line_and_a_failing_status(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"preprocess": {"size": 100}}))
    result = run("-m", "stages.preprocess", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "python -m stages.preprocess: error: config.yaml: preprocess.size: 100 is not a multiple of 8"
    ]


@pytest.mark.parametrize("name, family, prediction", [("tiny-sd15", "sd1", "epsilon"), ("tiny-sd2-v", "sd2-v", "v_prediction"), ("tiny-sdxl", "sdxl", "epsilon")])
def test_export_model_writes_loadable_folder_and_single_file(name, family, prediction, tmp_path):
    tiflow = Path(sys.executable).with_name("tiflow")
    command = [str(tiflow)] if tiflow.exists() else [sys.executable, "-m", "stages.tools.cli"]
    result = subprocess.run([*command, "export-model", f"builtin:{name}", str(tmp_path / "tiny"), "--single-file", str(tmp_path / "tiny.safetensors")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from stages.common.models import load_model

    builtin, folder, single = (load_model(p) for p in (f"builtin:{name}", str(tmp_path / "tiny"), str(tmp_path / "tiny.safetensors")))
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    sdxl = family == "sdxl"
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    assert ("text_encoder_2" in index and "tokenizer_2" in index) == sdxl
    parts = ("unet", "vae", "text_encoder", "text_encoder_2") if sdxl else ("unet", "vae", "text_encoder")
    for loaded in (folder, single):
        assert loaded.family.name == family and len(loaded.tokenizer) == 49408
        assert loaded.scheduler.config.prediction_type == prediction
        assert loaded.tokenizer.pad_token == builtin.tokenizer.pad_token
        if sdxl:
            assert loaded.tokenizer_2.pad_token == "!" and len(loaded.tokenizer_2) == 49408
        for part in parts:
            expected, actual = getattr(builtin, part).state_dict(), getattr(loaded, part).state_dict()
            assert expected.keys() == actual.keys()
            assert all(torch.equal(expected[k], actual[k]) for k in expected), part


def test_export_model_refuses_an_unknown_builtin(tmp_path):
    result = run("-m", "stages.tools.cli", "export-model", "builtin:nope", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 1 and "unknown builtin model 'nope'" in result.stderr
