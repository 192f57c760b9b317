"""Mistakes that need no image are caught when the workflow starts, before any stage runs, naming the key."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from stages.common.config import ConfigError, validate_config
from stages.common.preflight import check_before_work


def start_workflow(workdir: Path, config: dict | str) -> tuple[subprocess.CompletedProcess, float]:
    (workdir / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2"],
                            capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - started


MISTAKES = [
    ({"runs": {"cat": {}}}, "runs: cat", "already the vocabulary token"),
    ({"runs": {"zzqtok": {"template": "subjects"}}}, "runs.zzqtok.template", "neither a built-in template"),
    ({"model": {"path": "builtin:sd1.5"}, "runs": {"zzqtok": {}}}, "model.path", "unknown builtin model 'sd1.5'"),
    ({"runs": {"zzqtok": {"init_from": "missing/start.pt"}}}, "runs.zzqtok.init_from", "missing/start.pt does not exist"),
    ({"train": {"init_text": "a red toy on a table"}, "runs": {"zzqtok": {"vectors": 2}}}, "train.init_text", "raise vectors to"),
    ({"dataset": {"images": "no/such/folder"}, "runs": {"zzqtok": {}}}, "dataset.images", "is not a folder"),
]


@pytest.mark.parametrize("config, key, says", [MISTAKES[0], MISTAKES[5]], ids=["trigger word", "image folder"])
def test_a_mistake_stops_the_workflow_before_any_stage_runs(tmp_path, config, key, says):
    result, seconds = start_workflow(tmp_path, dict({"preprocess": {"size": 64}}, **config))
    assert result.returncode != 0
    assert f"tiflow: config.yaml: {key}" in result.stderr or f"tiflow: {key}" in result.stderr, result.stderr[-2000:]
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "workflow.py" not in result.stderr  # one sentence, no Snakemake traceback
    assert not (tmp_path / "out").exists()  # no stage started
    print(f"{key}: refused in {seconds:.1f} s")  # `pytest -s` shows the times: about 2 s each here


@pytest.mark.parametrize("config, key, says", MISTAKES)
def test_each_mistake_gets_one_line_naming_its_key(config, key, says):
    """What the Snakefile runs at its start (the two tests above show it stops the workflow there)."""
    with pytest.raises(ConfigError) as raised:
        check_before_work(validate_config(dict({"preprocess": {"size": 64}}, **config)))
    assert str(raised.value).startswith(key) and says in str(raised.value)


def test_a_yaml_error_names_its_line(tmp_path):
    text = "out_dir: out\nruns:\n  zzqtok: {steps: 10\n  other: {}\n"
    result, _ = start_workflow(tmp_path, text)
    assert result.returncode != 0 and "tiflow: config.yaml: not valid YAML at line 4, column" in result.stderr, result.stderr[-2000:]


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key; did you mean train\.steps\?"):
        validate_config({"train": {"stpes": 10}})
    with pytest.raises(ConfigError, match=r"runs: 'my run' is not allowed: a run name .* no spaces"):
        validate_config({"runs": {"my run": {}}})


def test_home_folder_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data" / "myshape").mkdir(parents=True)
    config = validate_config({"dataset": {"images": "~/data/myshape"}, "runs": {"zzqtok": {"init_from": "~/start.pt"}}})
    assert config["dataset"]["images"] == str(tmp_path / "data" / "myshape")
    assert config["runs"]["zzqtok"]["init_from"] == str(tmp_path / "start.pt")
    with pytest.raises(ConfigError, match=rf"runs.zzqtok.init_from: {tmp_path / 'start.pt'} does not exist"):
        check_before_work(config)  # the folder passed; the init_from file is looked for in the home folder too


def test_an_init_from_past_steps_or_of_another_size_is_refused(tmp_path):
    import torch

    from stages.common.embedding.core import Embedding, save_embedding_files

    save_embedding_files(Embedding("start", {"emb_params": torch.zeros(2, 768)}, step=500), tmp_path, "start")
    config = {"runs": {"zzqtok": {"init_from": str(tmp_path / "start.safetensors"), "vectors": 2, "steps": 400}}}
    with pytest.raises(ConfigError, match="runs.zzqtok.steps: 400 is not past step 500"):
        check_before_work(validate_config(config))
    config["runs"]["zzqtok"].update(vectors=3, steps=1000)
    with pytest.raises(ConfigError, match="has 2 vectors; set runs.zzqtok.vectors: 2"):
        check_before_work(validate_config(config))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="junk.pt is not an embedding tiflow can read"):
        check_before_work(validate_config({"runs": {"zzqtok": {"init_from": str(tmp_path / "junk.pt")}}}))


def test_passed_trigger_checks_are_remembered_and_a_new_word_is_still_checked(tmp_path, monkeypatch):
    from stages.common import clip_vocab
    from stages.common.config import validate_config
    from stages.common.preflight import check_before_work

    memo = tmp_path / "memo.json"
    check_before_work(validate_config({"runs": {"zzqtok": {"init_text": "cat"}}}), memo)
    assert memo.is_file()

    def no_tokenizer(*_, **__):
        raise AssertionError("the tokenizer was loaded for words already checked")

    with monkeypatch.context() as patched:
        patched.setattr(clip_vocab, "build_clip_tokenizer", no_tokenizer)
        check_before_work(validate_config({"runs": {"zzqtok": {"init_text": "cat"}}}), memo)  # nothing new: no tokenizer
    with pytest.raises(ConfigError, match="trigger word 'cat' is already the vocabulary token"):
        check_before_work(validate_config({"runs": {"zzqtok": {"init_text": "cat"}, "cat": {}}}), memo)
    memo.write_text("not json")  # a damaged memo checks everything again
    check_before_work(validate_config({"runs": {"zzqtok": {"init_text": "cat"}}}), memo)


def test_a_missing_clip_model_folder_is_refused_at_the_start(tmp_path):
    from stages.common.config import ConfigError, validate_config
    from stages.common.preflight import check_paths

    config = validate_config({"evaluate": {"clip_model": str(tmp_path / "clip")}, "runs": {"zzqtok": {}}})
    with pytest.raises(ConfigError, match=r"evaluate.clip_model: .*clip is not a folder; .*set evaluate.clip_model: null"):
        check_paths(config)
    (tmp_path / "clip").mkdir()
    check_paths(config)
