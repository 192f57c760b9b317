import pytest
import yaml

from stages.common.config import ConfigError, load_config, run_settings, validate_config
from stages.common.schedule import learning_rate_at, parse_learning_rate

from conftest import REPO


def test_repository_config_is_valid_and_has_the_spec_keys():
    config = load_config(REPO / "config.yaml")
    assert set(config) >= {"out_dir", "model", "dataset", "preprocess", "caption", "train", "runs", "evaluate"}
    assert set(config["model"]) >= {"path", "family", "clip_skip"}
    assert set(config["train"]) >= {"init_text", "vectors", "template", "learning_rate", "steps", "batch_size", "grad_accum", "save_every", "seed"}
    assert set(config["evaluate"]) >= {"prompts", "seeds"}


def test_defaults_fill_an_empty_config():
    config = validate_config({})
    assert config["model"]["path"] == "builtin:tiny-sd15"
    assert config["preprocess"]["size"] == 512
    assert config["train"]["learning_rate"] == 0.005
    assert list(config["runs"]) == ["demotok"]


@pytest.mark.parametrize(
    "config, key",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"stepz": 3}}, "stepz"),
        ({"preprocess": {"mode": "zoom"}}, "preprocess.mode"),
        ({"preprocess": {"size": 100}}, "preprocess.size"),
        ({"model": {"family": "sd3"}}, "model.family"),
        ({"train": {"learning_rate": "0.1:abc"}}, "train.learning_rate"),
        ({"runs": {"x": {"learning_rate": -1}}}, "runs.x.learning_rate"),
    ],
)
def test_bad_values_name_the_key(config, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(config)


def test_run_overrides_train_defaults_without_masking_them():
    config = validate_config({"train": {"steps": 77, "learning_rate": 0.01}, "runs": {"a": {"vectors": 3}, "b": None}})
    a, b = run_settings(config, "a"), run_settings(config, "b")
    assert (a["vectors"], a["steps"], a["learning_rate"], a["token"]) == (3, 77, 0.01, "a")
    assert (b["vectors"], b["steps"], b["token"]) == (1, 77, "b")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"train": {"steps": 0}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: train\.steps"):
        load_config(bad)


def test_a1111_schedule():
    schedule = parse_learning_rate("0.05:100, 0.01:1000, 0.005")
    assert [learning_rate_at(schedule, s, 5000) for s in (0, 99, 100, 999, 1000, 4999)] == [0.05, 0.05, 0.01, 0.01, 0.005, 0.005]
    fractional = parse_learning_rate("0.1:0.5, 0.01")  # fractions of the total steps
    assert learning_rate_at(fractional, 49, 100) == 0.1 and learning_rate_at(fractional, 50, 100) == 0.01
    assert learning_rate_at(parse_learning_rate(0.003), 123, 200) == 0.003
    with pytest.raises(ValueError, match="only the last"):
        parse_learning_rate("0.1, 0.01:100")
