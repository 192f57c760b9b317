"""`tiflow prompts`: the exact prompts and token ids training will use, with warnings."""
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.tools.prompt_report import build_prompt_report, format_prompt_report, prompts_command
from stages.common.config import load_config
from stages.common.tokens import TokenError

CAPTIONS = {
    "short.png": "a photo of a cat",
    "named.png": "[name] riding a bike",
    "long.png": ", ".join(["blue hair"] * 40),
}


def write_config(tmp_path: Path, runs: dict, captions: dict = CAPTIONS, train: dict | None = None) -> Path:
    out = tmp_path / "out"
    (out / "caption").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"image": list(captions), "caption_file": [Path(i).with_suffix(".txt").name for i in captions],
                          "caption": list(captions.values()), "source": "existing"})
    table.to_csv(out / "caption" / "captions.csv", index=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(out), "runs": runs, "train": train or {}}), encoding="utf-8")
    return path


def test_prompts_and_token_ids_follow_the_training_rules(tmp_path):
    config = load_config(write_config(tmp_path, {"mytok": {"vectors": 2}}))
    [run] = build_prompt_report(config)
    assert run.placeholder_ids == {"mytok": 49408, "mytok_1": 49409}
    rows = {row.image: row for row in run.rows}
    short = rows["short.png"]
    assert short.prompt == "mytok, a photo of a cat"  # template: captions puts the trigger in front
    # <|startoftext|> mytok mytok_1 , a photo of a cat <|endoftext|>
    assert short.token_ids == (49406, 49408, 49409, 267, 320, 1125, 539, 320, 2368, 49407)
    assert short.token_count == 8 and short.warnings == ()
    assert rows["named.png"].prompt == "mytok riding a bike"
    long = rows["long.png"]
    assert long.token_count > 75 and len(long.token_ids) == 77  # cut to the window, as training does
    assert any("runs past the 75-token window" in w for w in long.warnings)


def test_templates_give_one_prompt_per_line_and_warn_without_the_trigger(tmp_path):
    template = tmp_path / "mine.txt"
    template.write_text("a photo of [name], [filewords]\na picture of [filewords]\n", encoding="utf-8")
    config = load_config(write_config(tmp_path, {"mytok": {"template": str(template)}}, captions={"short.png": "a photo of a cat"}))
    [run] = build_prompt_report(config)
    assert [(row.template_line, row.prompt) for row in run.rows] == [(1, "a photo of mytok, a photo of a cat"), (2, "a picture of a photo of a cat")]
    assert run.rows[0].warnings == ()
    assert run.rows[1].warnings == ("never contains the trigger word 'mytok', so this prompt does not train the embedding",)
    text = format_prompt_report([run])
    assert "short.png [template line 2]" in text and "warning: never contains the trigger word" in text and "2 prompts, 1 with warnings" in text


def test_one_run_or_all_and_clear_refusals(tmp_path, capsys):
    path = write_config(tmp_path, {"mytok": {}, "othertok": {"token": "othertk"}}, train={"shuffle_tags": True})
    config = load_config(path)
    assert [r.run for r in build_prompt_report(config)] == ["mytok", "othertok"]
    assert [r.trigger for r in build_prompt_report(config, "othertok")] == ["othertk"]
    assert prompts_command(path, "mytok") == 0
    printed = capsys.readouterr().out
    assert "run mytok: trigger 'mytok' → new tokens mytok=49408" in printed and "shuffled or dropped per step" in printed
    assert "ids (8/75 tokens): 49406 49408 267 320 1125 539 320 2368 49407" not in printed  # one vector: no mytok_1
    assert "ids (7/75 tokens): 49406 49408 267 320 1125 539 320 2368 49407" in printed
    with pytest.raises(ValueError, match="no run named 'nope'"):
        build_prompt_report(config, "nope")
    with pytest.raises(TokenError, match="already the vocabulary token"):
        build_prompt_report(load_config(write_config(tmp_path, {"cat": {}})))
    (tmp_path / "out" / "caption" / "captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions.csv does not exist; write the captions first"):
        build_prompt_report(config)
