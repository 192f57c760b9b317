"""Training options: schedules, caption augmentation, data order, per-family targets, SD 2.x, held-out learning."""
import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from stages.common.models import load_model
from stages.common.schedule import schedule_factor
from stages.common.latents import load_examples
from stages.train.order import BatchOrder
from stages.train.optim import LearningRate
from stages.train.outputs import RunOutputs
from stages.common.prompts import augment_caption, build_prompt
from stages.train.resume import ResumeStore
from stages.common.textual_inversion import TextualInversion, fixed_probe, probe_loss, starting_point
from stages.train.settings import TrainSettings
from stages.train.trainer import Trainer, train_embedding


def test_warmup_then_cosine_and_linear_decay():
    cosine = LearningRate(0.1, "cosine", warmup_steps=10, total_steps=110)
    assert cosine.at(0) == pytest.approx(0.01) and cosine.at(9) == pytest.approx(0.1)
    assert cosine.at(10) == pytest.approx(0.1) and cosine.at(60) == pytest.approx(0.05) and cosine.at(110) == pytest.approx(0.0, abs=1e-12)
    linear = LearningRate(0.1, "linear", warmup_steps=0, total_steps=100)
    assert linear.at(25) == pytest.approx(0.075)
    a1111 = LearningRate("0.05:10, 0.005", "constant", 0, 100)
    assert (a1111.at(9), a1111.at(10)) == (0.05, 0.005)
    with pytest.raises(ValueError, match="lr_scheduler"):
        schedule_factor("exponential", 1, 10)


def test_caption_augmentation_keeps_the_first_tags():
    rng = random.Random(0)
    caption = "mychar, red dress, smile, outdoors, sky, tree"
    seen = {augment_caption(caption, rng, shuffle_tags=True, keep_tokens=2, tag_dropout=0.0, caption_dropout=0.0) for _ in range(30)}
    assert len(seen) > 1 and all(s.startswith("mychar, red dress, ") for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    dropped = [augment_caption(caption, rng, False, 1, tag_dropout=0.5, caption_dropout=0.0) for _ in range(50)]
    assert all(d.startswith("mychar") for d in dropped) and min(len(d.split(", ")) for d in dropped) < 6
    assert augment_caption(caption, rng, False, 0, 0.0, caption_dropout=1.0) == ""
    assert build_prompt(None, "", "mychar") == "mychar"  # caption dropout leaves the trigger alone


def test_each_image_appears_repeats_times_per_pass():
    order = BatchOrder([(8, 8)] * 5, batch_size=1, repeats=3, seed=1)
    first_pass = [order.next_batch()[0] for _ in range(15)]
    assert sorted(first_pass) == sorted(list(range(5)) * 3)
    saved = order.state_dict()
    continued = [order.next_batch() for _ in range(7)]
    order.load_state_dict(saved)
    assert [order.next_batch() for _ in range(7)] == continued


@pytest.mark.parametrize("model, target", [("tiny-sd15", "epsilon"), ("tiny-sd2", "epsilon"), ("tiny-sd2-v", "v_prediction")])
def test_loss_target_follows_the_family(model, target):
    bundle = load_model(f"builtin:{model}")
    assert bundle.family.prediction_type == target
    ti = TextualInversion(bundle, "zzqtok", {"emb_params": torch.zeros(1, bundle.text_widths[0])}, clip_skip=1)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        loss = ti.loss(latents, ["zzqtok"], noise, t)
        scaled = latents * bundle.family.vae_scaling_factor
        prediction = bundle.unet(bundle.scheduler.add_noise(scaled, noise, t), t, ti.context(["zzqtok"])).sample
    expected_target = bundle.scheduler.get_velocity(scaled, noise, t) if target == "v_prediction" else noise
    assert loss.item() == pytest.approx(F.mse_loss(prediction, expected_target).item(), rel=1e-5)


def test_sd2_trains_with_its_own_padding(demo_prepared, tmp_path):
    bundle = load_model("builtin:tiny-sd2-v")
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    settings = TrainSettings.from_schema(name="zzqtok", token="zzqtok", init_text="toy", vectors=3, steps=3, save_every=0, learning_rate=0.05)
    result = train_embedding(bundle, examples, settings, tmp_path)
    assert result.embedding.vectors["emb_params"].shape == (3, 32)
    assert not torch.allclose(result.embedding.vectors["emb_params"], result.initial_vectors["emb_params"])
    ids = TextualInversion(load_model("builtin:tiny-sd2"), "zzqtok", {"emb_params": torch.zeros(3, 32)}, clip_skip=1).prompt_ids(["a zzqtok"])[0][0].tolist()
    # OpenCLIP prompts: <start> a zzqtok zzqtok_1 zzqtok_2 <end>, then "!" (id 0) padding, not <|endoftext|>
    assert ids[:6] == [49406, 320, 49408, 49409, 49410, 49407] and set(ids[6:]) == {0}


def test_loss_on_held_out_images_falls(demo_prepared, tmp_path):
    """Train on six demo images; the loss on the other two (fixed noise and timesteps) must drop clearly."""
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    train_set, held_out = examples[:6], examples[6:]
    settings = TrainSettings.from_schema(name="demotok", token="demotok", init_text="red toy", vectors=2, learning_rate=0.05, steps=60,
                             batch_size=4, save_every=0)
    trainer = Trainer(load_model("builtin:tiny-sd15"), train_set, settings, RunOutputs(tmp_path, "demotok"), ResumeStore(None))
    probe = fixed_probe(held_out, 8, seed=123, num_timesteps=1000)
    prompts = [build_prompt(None, e.caption, "demotok") for e in held_out]
    before = probe_loss(trainer.model, held_out, probe, prompts)
    trainer.run()
    after = probe_loss(trainer.model, held_out, probe, prompts)
    assert after < 0.97 * before, (before, after)


def test_previews_are_rendered_every_n_steps(demo_prepared, tmp_path):
    from PIL import Image

    from stages.train.preview import make_previewer

    bundle = load_model("builtin:tiny-sd15")
    settings = TrainSettings.from_schema(name="demotok", token="demotok", steps=4, save_every=0, preview_every=2,
                             preview={"prompt": "a photo of [name]", "negative_prompt": "", "seed": 1, "steps": 2, "guidance_scale": 7.0})
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    previewer = make_previewer(bundle, settings.preview, "demotok", (64, 64), RunOutputs(tmp_path, "demotok"))
    train_embedding(bundle, examples, settings, tmp_path, preview=previewer)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["demotok-2.png", "demotok-4.png"]
    first, second = (Image.open(tmp_path / "previews" / name) for name in ("demotok-2.png", "demotok-4.png"))
    assert first.size[1] >= 64 and list(first.getdata()) != list(second.getdata())  # the vectors changed in between
    from stages.common.embedding.read import read_embedding

    carried = read_embedding(tmp_path / "previews" / "demotok-2.png")  # AUTOMATIC1111's embedding-in-PNG
    assert carried.step == 2 and carried.vectors["emb_params"].shape == (1, 32)


def test_init_from_an_existing_embedding_keeps_its_step_count(demo_prepared, tmp_path):
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    first = train_embedding(load_model("builtin:tiny-sd15"), examples,
                            TrainSettings.from_schema(name="demotok", token="demotok", vectors=2, steps=3, save_every=0, learning_rate=0.05), tmp_path / "a")
    # steps is AUTOMATIC1111's Max steps: the step to end at, counting the embedding's own 3
    settings = TrainSettings.from_schema(name="demotok", token="demotok", vectors=2, steps=5, save_every=0, init_from=str(tmp_path / "a" / "demotok.pt"))
    bundle = load_model("builtin:tiny-sd15")
    vectors, step = starting_point(bundle, settings.init_text, settings.init_from, settings.vectors)
    assert step == 3 and torch.equal(vectors["emb_params"], first.embedding.vectors["emb_params"])
    second = train_embedding(bundle, examples, settings, tmp_path / "b", start_vectors=vectors, start_step=step)
    assert torch.equal(second.initial_vectors["emb_params"], vectors["emb_params"]) and second.embedding.step == 5 and len(second.losses) == 2
    assert torch.load(tmp_path / "b" / "demotok.pt", weights_only=True)["step"] == 5
    with pytest.raises(ValueError, match="set steps above 3"):  # already trained that far: nothing to do
        train_embedding(load_model("builtin:tiny-sd15"), examples, dataclasses.replace(settings, steps=3), tmp_path / "c",
                        start_vectors=vectors, start_step=step)
    with pytest.raises(ValueError, match="set vectors: 2"):
        starting_point(bundle, "*", str(tmp_path / "a" / "demotok.pt"), 3)


@pytest.mark.parametrize("model, options", [("tiny-sd15", {"gradient_checkpointing": True}), ("tiny-sd15", {"channels_last": True}),
                                            ("tiny-sdxl", {"gradient_checkpointing": True})])
def test_exact_speed_options_do_not_change_the_maths(demo_prepared, tmp_path, model, options):
    """Recomputing activations or changing the memory layout must give the fp32 result up to summation order."""
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    base = dict(name="demotok", token="demotok", init_text="toy", vectors=2, steps=3, save_every=0, learning_rate=0.05, batch_size=2)
    reference = train_embedding(load_model(f"builtin:{model}"), examples, TrainSettings.from_schema(**base), tmp_path / "ref")
    result = train_embedding(load_model(f"builtin:{model}"), examples, TrainSettings.from_schema(**base, **options), tmp_path / "opt")
    for key, vectors in result.embedding.vectors.items():
        assert vectors.dtype == torch.float32 and not torch.allclose(vectors, result.initial_vectors[key])
        # the same fp32 maths in another order: differences are a few fp32 roundings, far below one training step's change
        torch.testing.assert_close(vectors, reference.embedding.vectors[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model, precision, dtype", [("tiny-sd15", "bf16", torch.bfloat16), ("tiny-sd15", "fp16", torch.float16),
                                                     ("tiny-sdxl", "bf16", torch.bfloat16)])
def test_half_precision_trains_fp32_vectors_in_a_half_precision_model(demo_prepared, tmp_path, model, precision, dtype):
    """What precision: bf16/fp16 promise: the frozen model computes in that type, the vectors stay fp32 masters that
    start exactly at the fp32 starting point and learn. How close the result is to fp32 depends on the CPU's
    half-precision kernels (AMX, AVX-512 BF16 or emulation), so no tolerance against the fp32 run is asserted."""
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    settings = TrainSettings.from_schema(name="demotok", token="demotok", init_text="toy", vectors=2, steps=6, save_every=0, learning_rate=0.05,
                             batch_size=2, precision=precision)
    bundle = load_model(f"builtin:{model}")  # SDXL: both text encoders in half precision, the new rows of each in fp32
    trainer = Trainer(bundle, examples, settings, RunOutputs(tmp_path, "demotok"), ResumeStore(None))
    assert all(module.dtype == dtype for module in bundle.frozen_modules)
    for key, vectors in trainer.model.vectors.items():
        assert vectors.dtype == torch.float32
        assert torch.equal(vectors.detach(), trainer.model.initial[key])  # not rounded through the half-precision encoder
    result = trainer.run()
    assert all(math.isfinite(loss) for loss in result.losses) and result.skipped_steps == 0
    for key, vectors in result.embedding.vectors.items():
        assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
        moved = (vectors - result.initial_vectors[key]).abs().max().item()
        assert moved > 0.01, key  # six AdamW steps at lr 0.05 move a vector by about 0.05 each step whatever the precision
