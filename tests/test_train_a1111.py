"""Settings that carry AUTOMATIC1111's names behave as AUTOMATIC1111's own code does."""
import pytest
import torch

from stages.common.families import clip_skip_warning, get_family, resolution_warning
from stages.common.models import load_model
from stages.common.latents import load_examples
from stages.train.optim import LearningRate
from stages.common.textual_inversion import starting_point
from stages.train.settings import TrainSettings
from stages.train.trainer import train_embedding


def a1111_rates(learn_rate: str, max_steps: int, cur_step: int = 0) -> list[float]:
    """The rate of every step AUTOMATIC1111 trains, restated from its code as the reference.

    modules/textual_inversion/learn_schedule.py: LearnScheduleIterator keeps the (rate, end)
    pairs whose end lies past cur_step, caps each end at max_steps, stops reading at a pair past
    max_steps, at -1 or at a bare rate (both mean max_steps). LearnRateScheduler.apply(step) moves
    to the next pair once step reaches the current end, and `finished` (when the pairs run out)
    ends train_embedding's loop.
    """
    pairs = []
    for pair in learn_rate.split(","):
        if not pair.strip():
            continue
        parts = pair.split(":")
        if len(parts) == 2:
            step = int(parts[1])
            if step > cur_step:
                pairs.append((float(parts[0]), min(step, max_steps)))
                if step > max_steps:
                    break
            elif step == -1:
                pairs.append((float(parts[0]), max_steps))
                break
        else:
            pairs.append((float(parts[0]), max_steps))
            break
    remaining = iter(pairs)
    rate, end = next(remaining)
    rates, step = [], cur_step
    while True:
        if step >= end:  # LearnRateScheduler.step
            try:
                rate, end = next(remaining)
            except StopIteration:
                break  # scheduler.finished: training stops
        rates.append(rate)
        step += 1
    return rates


@pytest.mark.parametrize("schedule, steps, start", [
    ("0.05:10, 0.01:30, 0.005", 60, 0),  # ends with a bare rate: to the end
    ("0.05:10, 0.01:30", 60, 0),  # the last bound comes first: training stops at 30
    ("0.05:10, 0.01:-1", 60, 0),  # -1: until the end
    ("0.05:10, 0.01:300", 60, 0),  # a bound past steps is cut to steps
    ("0.05:10, 0.01:30, 0.005", 60, 20),  # continuing an embedding at step 20: its schedule continues
    ("0.05:10, 0.01:30", 60, 20),
    ("0.002", 15, 0),
])
def test_learning_rate_schedule_matches_automatic1111(schedule, steps, start):
    rate = LearningRate(schedule, "constant", 0, steps, start_step=start)
    ours = [rate.at(step) for step in range(rate.steps_to_take)]
    assert ours == a1111_rates(schedule, steps, start)


def test_training_stops_where_the_schedule_ends(demo_prepared, tmp_path, caplog):
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    settings = TrainSettings.from_schema(name="demotok", token="demotok", learning_rate="0.05:2, 0.01:4", steps=10, save_every=0)
    result = train_embedding(load_model("builtin:tiny-sd15"), examples, settings, tmp_path)
    assert result.embedding.step == 4 and len(result.losses) == 4
    assert "ends at step 4, before steps: 10" in caplog.text
    assert torch.load(tmp_path / "demotok.pt", weights_only=True)["step"] == 4


def test_init_from_counts_toward_steps_and_continues_the_schedule(demo_prepared, tmp_path):
    """steps is AUTOMATIC1111's Max steps: an embedding at step 3 trained to steps 6 takes 3 more, at the schedule's rates for steps 4-6."""
    import pandas as pd

    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    schedule = "0.05:4, 0.01"
    train_embedding(load_model("builtin:tiny-sd15"), examples,
                    TrainSettings.from_schema(name="demotok", token="demotok", steps=3, save_every=0, learning_rate=schedule), tmp_path / "a")
    settings = TrainSettings.from_schema(name="demotok", token="demotok", steps=6, save_every=0, learning_rate=schedule,
                             init_from=str(tmp_path / "a" / "demotok.safetensors"))
    bundle = load_model("builtin:tiny-sd15")
    vectors, start = starting_point(bundle, settings.init_text, settings.init_from, settings.vectors)
    result = train_embedding(bundle, examples, settings, tmp_path / "b", start_vectors=vectors, start_step=start)
    log = pd.read_csv(tmp_path / "b" / "loss.csv")
    assert log.step.tolist() == [4, 5, 6] and result.embedding.step == 6
    assert log.lr.tolist() == a1111_rates(schedule, 6, cur_step=3) == [0.05, 0.01, 0.01]


def test_clip_skip_on_sd2_and_sdxl_warns_that_automatic1111_ignores_it():
    for family in ("sd2", "sd2-v", "sdxl"):
        warning = clip_skip_warning(get_family(family), 2)
        assert warning and "AUTOMATIC1111" in warning and "clip_skip: 1" in warning
        assert clip_skip_warning(get_family(family), 1) is None
    assert clip_skip_warning(get_family("sd1"), 2) is None  # AUTOMATIC1111 applies it to SD 1.x, as tiflow does


def test_training_far_below_the_native_resolution_is_warned_about():
    assert "preprocess.size: 1024" in resolution_warning(get_family("sdxl"), (512, 512))
    assert resolution_warning(get_family("sdxl"), (1024, 768)) is None and resolution_warning(get_family("sd1"), (512, 512)) is None
    assert "preprocess.size: 512" in resolution_warning(get_family("sd1"), (256, 256))
