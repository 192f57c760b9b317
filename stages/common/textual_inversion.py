"""The Textual Inversion core that train and evaluate share: model set-up, new token rows, prompts, loss, probe.

Train wraps it in an optimisation loop (stages/train/trainer.py); evaluate measures checkpoints
with it (stages/evaluate/validation.py). Both therefore compute exactly the same loss.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.common.config import section_properties
from stages.common.embedding.core import Embedding
from stages.common.errors import InputError
from stages.common.embedding.read import read_embedding_for_model
from stages.common.latents import LatentExample
from stages.common.models import ModelBundle
from stages.common.prompts import build_prompt
from stages.common.trigger import NEGATIVE_SUFFIX
from stages.common.tokens import (
    add_placeholder_tokens,
    encode_text,
    expand_trigger,
    initial_vectors,
    install_trainable_embedding,
    negative_prompt,
    tokenize_prompts,
)

NEGATIVE_NUDGE = 1e-3  # DreamArtist nudges the negative's start so it never starts equal to the positive


def starting_point(bundle: ModelBundle, init_text: str, init_from: str | None, vectors: int) -> tuple[dict[str, torch.Tensor], int]:
    """(the vectors an embedding starts from, by embedding key, and the step count it carries).

    init_from's file, else init_text's tokens looked up in each text encoder's own vocabulary
    (SDXL's two encoders each start from their own rows for the same words). Call before the
    run's token is installed.
    """
    if not init_from:
        return words_start(bundle, init_text, vectors), 0
    # any format tiflow reads; a width that does not fit names both widths and the file's family
    embedding = read_embedding_for_model(init_from, bundle.family, bundle.text_widths)
    if embedding.vector_count != vectors:
        raise InputError(f"train.init_from: {init_from} has {embedding.vector_count} vectors; set vectors: {embedding.vector_count} for this run")
    return {key: tensor.float() for key, tensor in embedding.vectors.items()}, embedding.step


def words_start(bundle: ModelBundle, init_text: str, vectors: int) -> dict[str, torch.Tensor]:
    """init_text's vectors in each text encoder's own vocabulary (AUTOMATIC1111's rule), by embedding key."""
    return {slot.embedding_key: initial_vectors(tokenizer, encoder.get_input_embeddings().weight.detach(), init_text, vectors)
            for slot, tokenizer, encoder in bundle.encoder_slots()}


@dataclass(frozen=True)
class AptSettings:
    """DreamArtist's APT (train.apt): a negative embedding trained through neg + cfg_scale·(pos − neg)."""

    vectors_neg: int
    init_text_neg: str
    cfg_scale: float
    ema: float  # moving-average decay of both embeddings; 0 = off
    reconstruction: bool
    reconstruction_weight: float

    @classmethod
    def from_section(cls, value: dict | None) -> "AptSettings | None":
        """From train.apt (None: plain Textual Inversion); keys a run leaves out take the schema's defaults."""
        if value is None:
            return None
        defaults = {key: spec["default"] for key, spec in section_properties("train")["apt"]["properties"].items()}
        return cls(**{**defaults, **value})


def negative_starting_point(bundle: ModelBundle, apt: AptSettings, seed: int) -> dict[str, torch.Tensor]:
    """The APT negative embedding's start: init_text_neg's vectors plus DreamArtist's 1e-3 nudge.

    The nudge is drawn from train.seed + 4 (stages/train/streams.py names the offsets), so
    evaluate rebuilds the same start. Call before the run's tokens are installed.
    """
    generator = torch.Generator().manual_seed(seed + 4)
    return {key: words + NEGATIVE_NUDGE * torch.randn(words.shape, generator=generator)
            for key, words in words_start(bundle, apt.init_text_neg, apt.vectors_neg).items()}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True)
class PromptConditioning:
    """What the UNet takes from a prompt: the cross-attention context, and for SDXL the pooled text embedding."""

    context: torch.Tensor  # [batch, 77, width]: the text encoders' hidden states side by side
    pooled: torch.Tensor | None = None  # [batch, projection]: SDXL's second encoder, projected

    def unet_inputs(self, dtype: torch.dtype, time_ids: torch.Tensor | None) -> dict:
        """The keyword arguments a UNet2DConditionModel call takes for this conditioning."""
        inputs = {"encoder_hidden_states": self.context.to(dtype)}
        if self.pooled is not None:
            inputs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": time_ids.to(self.pooled.device, dtype)}
        return inputs


def size_time_ids(sizes: list[tuple[int, ...] | None], latent_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's add_time_ids [batch, 6]: (original h, w, crop top, left, target h, w) per image.

    An example without a recorded size condition counts as uncropped at its own size.
    """
    height, width = latent_size[0] * 8, latent_size[1] * 8
    return torch.tensor([list(size) if size is not None else [height, width, 0, 0, height, width] for size in sizes], dtype=torch.float32)


class TextualInversion:
    """The frozen model plus the embedding's trainable vectors, and the loss that trains them.

    Train optimises `parameters` through `loss`; evaluate swaps checkpoints' vectors in and measures
    the same loss. The token gets new rows in each tokenizer and text encoder of the family (SDXL:
    both); nothing else of the model changes.
    """

    def __init__(self, bundle: ModelBundle, token: str, start_vectors: dict[str, torch.Tensor], clip_skip: int,
                 apt: AptSettings | None = None, negative_start: dict[str, torch.Tensor] | None = None):
        self.bundle, self.token, self.clip_skip, self.apt = bundle, token, clip_skip, apt
        self.slots = bundle.encoder_slots()
        keys = [slot.embedding_key for slot, _, _ in self.slots]
        starts = {token: start_vectors}
        if apt is not None:
            if negative_start is None:
                raise InputError(f"APT run {token!r} needs the negative embedding's start vectors (negative_starting_point)")
            starts[token + NEGATIVE_SUFFIX] = negative_start
        for name, start in starts.items():
            if sorted(start) != sorted(keys):
                raise InputError(f"start vectors of {name!r} for {', '.join(sorted(start))}, but a {bundle.family.name} model takes {', '.join(keys)}")
        self.starts = {name: {key: start[key].float() for key in keys} for name, start in starts.items()}
        self.counts = {name: start[keys[0]].shape[0] for name, start in self.starts.items()}
        self.vector_count = self.counts[token]
        for slot, tokenizer, encoder in self.slots:
            ids = [i for name, count in self.counts.items() for i in add_placeholder_tokens(tokenizer, name, count)]
            base = encoder.get_input_embeddings().weight.shape[0]
            if ids != list(range(base, base + len(ids))):  # the trainable rows follow the vocabulary in this order
                raise InputError(f"{slot.component}'s tokenizer gave the new tokens ids {ids[0]}..{ids[-1]}, not the rows after its "
                                 f"{base}-row vocabulary; load the model afresh for each run")
        embeddings = {slot.embedding_key: install_trainable_embedding(encoder, *(start[slot.embedding_key] for start in self.starts.values()))
                      for slot, _, encoder in self.slots}
        # the trainable blocks by embedding name (the run's, then {run}-neg) and key
        self.trained = {name: {key: embedding.blocks[index] for key, embedding in embeddings.items()} for index, name in enumerate(self.starts)}
        self._ids_cache: dict[str, list[torch.Tensor]] = {}

    @property
    def initial(self) -> dict[str, torch.Tensor]:
        """The run's own embedding's start vectors, by embedding key."""
        return self.starts[self.token]

    @property
    def negative_token(self) -> str | None:
        return self.token + NEGATIVE_SUFFIX if self.apt is not None else None

    @property
    def vectors(self) -> dict[str, torch.nn.Parameter]:
        """The run's own embedding's trainable rows by embedding key (emb_params, or clip_l and clip_g)."""
        return self.trained[self.token]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable row block: the run's embedding and, with APT, its negative one."""
        return [vectors for embedding in self.trained.values() for vectors in embedding.values()]

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device

    def prompt_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids [batch, 77] per text encoder, each padded by its own tokenizer's rule."""
        for prompt in prompts:
            if prompt not in self._ids_cache:
                expanded = prompt
                for name, count in self.counts.items():
                    expanded = expand_trigger(expanded, name, count)
                self._ids_cache[prompt] = [tokenize_prompts(tokenizer, [expanded], slot.pad_with_eos)[0] for slot, tokenizer, _ in self.slots]
        return [torch.stack([self._ids_cache[p][index] for p in prompts]).to(self.device) for index in range(len(self.slots))]

    def conditioning(self, prompts: list[str]) -> PromptConditioning:
        hidden, pooled = [], None
        for (slot, tokenizer, encoder), ids in zip(self.slots, self.prompt_ids(prompts)):
            state, projected = encode_text(encoder, ids, self.clip_skip, self.bundle.family.penultimate_layer,
                                                 pooled_eos_id=tokenizer.eos_token_id if slot.pooled else None)
            hidden.append(state)
            pooled = projected if slot.pooled else pooled
        return PromptConditioning(torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0], pooled)

    def context(self, prompts: list[str]) -> torch.Tensor:
        return self.conditioning(prompts).context

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str], time_ids: torch.Tensor | None) -> torch.Tensor:
        """The UNet's prediction for the prompts; with APT, DreamArtist's neg + cfg_scale·(pos − neg) from one batched pass."""
        unet = self.bundle.unet
        if self.apt is None:
            return unet(noisy.to(unet.dtype), timesteps, **self.conditioning(prompts).unet_inputs(unet.dtype, time_ids)).sample
        negatives = [negative_prompt(prompt, self.token, self.negative_token) for prompt in prompts]
        both = self.conditioning(prompts + negatives)  # one text-encoder pass, one UNet pass over twice the batch
        doubled = torch.cat([time_ids, time_ids]) if time_ids is not None else None
        positive, negative = unet(torch.cat([noisy, noisy]).to(unet.dtype), torch.cat([timesteps, timesteps]),
                                  **both.unet_inputs(unet.dtype, doubled)).sample.chunk(2)
        return negative + self.apt.cfg_scale * (positive - negative)

    def loss(self, latents: torch.Tensor, prompts: list[str], noise: torch.Tensor, timesteps: torch.Tensor,
             sizes: list[tuple[int, ...] | None] | None = None) -> torch.Tensor:
        """Denoising loss for a batch: add noise → predict it from the prompt → mean squared error.

        `sizes` are the images' SDXL size conditions (LatentExample.size_condition); other families ignore them.
        """
        scheduler, family = self.bundle.scheduler, self.bundle.family
        latents = latents * family.vae_scaling_factor  # the UNet works on scaled latents
        noisy = scheduler.add_noise(latents, noise, timesteps)  # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        time_ids = size_time_ids(sizes or [None] * len(prompts), tuple(latents.shape[-2:])) if family.size_conditioning else None
        prediction = self.predict(noisy, timesteps, prompts, time_ids)
        if family.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)  # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
        else:
            target = noise  # eps-prediction
        loss = F.mse_loss(prediction.float(), target.float())
        if self.apt is not None and self.apt.reconstruction:
            loss = loss + self.apt.reconstruction_weight * self.reconstruction_loss(latents, noisy, prediction, timesteps)
        return loss

    def reconstruction_loss(self, latents: torch.Tensor, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DreamArtist's pixel loss: L1 between the decoded x0 the prediction implies and the image as the VAE decodes it.

        The cache holds latents, not pixels, so the image is the VAE's decoding of its clean latent:
        the loss then measures what the prediction misses, not the VAE's own error.
        """
        alpha = self.bundle.scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
        if self.bundle.family.prediction_type == "v_prediction":
            predicted = alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction.float()  # x0 = sqrt(a) x_t - sqrt(1 - a) v
        else:
            predicted = (noisy - (1 - alpha).sqrt() * prediction.float()) / alpha.sqrt()  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
        vae, scale = self.bundle.vae, self.bundle.family.vae_scaling_factor
        with torch.no_grad():
            image = vae.decode((latents / scale).to(vae.dtype)).sample
        return F.l1_loss(vae.decode((predicted / scale).to(vae.dtype)).sample.float(), image.float())

    def load_vectors(self, vectors: dict[str, torch.Tensor], source: str, name: str | None = None) -> None:
        """Put an embedding's (or a saved state's) vectors in place of the trainable rows of `name` (the run's own by default)."""
        for key, parameter in self.trained[name or self.token].items():
            if key not in vectors or vectors[key].shape != parameter.shape:
                got = tuple(vectors[key].shape) if key in vectors else "nothing"
                raise InputError(f"{source}: {key} is {got}, but the run's vectors are {tuple(parameter.shape)}; "
                                 "it comes from another training (other vectors or model); rerun train")
            with torch.no_grad():
                parameter.copy_(vectors[key])

    def current_embedding(self, name: str, step: int, vectors: dict[str, torch.Tensor] | None = None) -> Embedding:
        vectors = self.vectors if vectors is None else vectors
        return Embedding(name, {key: vector.detach().float().cpu().contiguous() for key, vector in vectors.items()},
                         step=step, checkpoint_hash=self.bundle.identity, checkpoint_name=self.bundle.display_name)

    def current_embeddings(self, name: str, step: int, vectors: dict[str, dict[str, torch.Tensor]] | None = None) -> list[Embedding]:
        """The run's embedding named `name` and, with APT, its negative one named `name`-neg (DreamArtist's file names)."""
        vectors = self.trained if vectors is None else vectors
        return [self.current_embedding(name + entry.removeprefix(self.token), step, vectors[entry]) for entry in self.trained]


def use_deterministic_kernels(enabled: bool, device: torch.device) -> None:
    """train.deterministic: only kernels that give the same bits on every run, where torch has them.

    On a CPU, runs are reproducible without this (stages/__init__.py fixes MKL's code path); on a
    GPU, atomics in some backward kernels and cuBLAS's workspace reuse make runs differ unless told.
    """
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed before cuBLAS's first call
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class ComputeOptions:
    """How the frozen model runs: train's precision and speed options (evaluate uses `ComputeOptions.plain`)."""

    precision: str
    gradient_checkpointing: bool
    channels_last: bool
    compile: bool
    deterministic: bool

    @classmethod
    def plain(cls, precision: str) -> "ComputeOptions":
        return cls(precision, gradient_checkpointing=False, channels_last=False, compile=False, deterministic=False)


def prepare_modules(bundle: ModelBundle, options: ComputeOptions, device: torch.device) -> torch.dtype:
    """Move the frozen modules to the device in the chosen precision and apply the speed options."""
    use_deterministic_kernels(options.deterministic, device)
    dtype = resolve_precision(options.precision, device)
    for module in bundle.frozen_modules:
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    if options.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout at train time in SD
    if options.channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
    if options.compile:
        bundle.unet = torch.compile(bundle.unet)
    return dtype


def spread_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """`count` timesteps spread evenly over the schedule (each in the middle of its share): every noise level counts."""
    return ((torch.arange(count) + 0.5) * num_timesteps / count).long().clamp(max=num_timesteps - 1)


def fixed_probe(examples: list[LatentExample], count: int, seed: int, num_timesteps: int):
    """A held-fixed set of (example index, noise, timestep) to measure loss comparably across steps.

    The timesteps are spread evenly over the schedule (shuffled over the examples): every noise
    level counts, and the number varies less between seeds than with random timesteps.
    """
    generator = torch.Generator().manual_seed(seed)
    picks = [i % len(examples) for i in range(count)]
    noise = [torch.randn(examples[i].mean.shape, generator=generator) for i in picks]
    spread = spread_timesteps(count, num_timesteps)
    return picks, noise, spread[torch.randperm(count, generator=generator)]


def probe_prompts(template: list[str] | None, examples: list[LatentExample], token: str) -> list[str]:
    """Each example's prompt as training builds it, without augmentation: the first template line, or its caption."""
    return [build_prompt(template[0] if template else None, e.caption, token) for e in examples]


@torch.no_grad()
def probe_loss(model: TextualInversion, examples: list[LatentExample], probe, prompts: list[str]) -> float:
    picks, noise, timesteps = probe
    device = model.device
    total = 0.0
    for index, i in enumerate(picks):
        latents = examples[i].mean[None].to(device)
        total += model.loss(latents, [prompts[i]], noise[index][None].to(device), timesteps[index : index + 1].to(device),
                            [examples[i].size_condition]).item()
    return total / len(picks)
