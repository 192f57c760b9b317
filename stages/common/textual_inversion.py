"""The Textual Inversion core that train and evaluate share: model set-up, new token rows, prompts, loss, probe.

Train wraps it in an optimisation loop (stages/train/trainer.py); evaluate measures checkpoints
with it (stages/evaluate/validation.py). Both therefore compute exactly the same loss.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.common.embedding.core import Embedding
from stages.common.errors import InputError
from stages.common.embedding.read import read_embedding_for_model
from stages.common.latents import LatentExample
from stages.common.models import ModelBundle
from stages.common.prompts import build_prompt
from stages.common.tokens import (
    add_placeholder_tokens,
    encode_prompt_ids,
    expand_trigger,
    initial_vectors,
    install_trainable_embedding,
    tokenize_prompts,
)


def starting_point(bundle: ModelBundle, init_text: str, init_from: str | None, vectors: int) -> tuple[torch.Tensor, int]:
    """(the vectors an embedding starts from, the step count it carries): init_from's file, else init_text's tokens.

    Call before the run's token is installed: init_text is looked up in the model's own vocabulary.
    """
    if not init_from:
        base_weight = bundle.text_encoder.get_input_embeddings().weight.detach()
        return initial_vectors(bundle.tokenizer, base_weight, init_text, vectors), 0
    # any format tiflow reads; a width that does not fit names both widths and the file's family
    embedding = read_embedding_for_model(init_from, bundle.family, (bundle.text_width,))
    start = embedding.vectors[bundle.family.text_encoders[0].embedding_key]
    if start.shape[0] != vectors:
        raise InputError(f"train.init_from: {init_from} has {start.shape[0]} vectors; set vectors: {start.shape[0]} for this run")
    return start.float(), embedding.step


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class TextualInversion:
    """The frozen model plus the embedding's trainable vectors, and the loss that trains them.

    Train optimises `vectors` through `loss`; evaluate swaps checkpoints' vectors in and measures
    the same loss. The token gets new rows in the tokenizer and text encoder; nothing else of the
    model changes.
    """

    def __init__(self, bundle: ModelBundle, token: str, start_vectors: torch.Tensor, clip_skip: int):
        self.bundle, self.token, self.vector_count, self.clip_skip = bundle, token, start_vectors.shape[0], clip_skip
        self.token_ids = add_placeholder_tokens(bundle.tokenizer, token, self.vector_count)
        self.initial = start_vectors.float()
        self.embedding = install_trainable_embedding(bundle.text_encoder, self.initial)
        self._ids_cache: dict[str, torch.Tensor] = {}

    @property
    def vectors(self) -> torch.nn.Parameter:
        return self.embedding.new_vectors

    def prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            if prompt not in self._ids_cache:
                expanded = expand_trigger(prompt, self.token, self.vector_count)
                self._ids_cache[prompt] = tokenize_prompts(self.bundle.tokenizer, [expanded], self.bundle.family.pad_with_eos)[0]
            rows.append(self._ids_cache[prompt])
        return torch.stack(rows).to(self.vectors.device)

    def context(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompt_ids(self.bundle.text_encoder, self.prompt_ids(prompts), self.clip_skip, self.bundle.family.penultimate_layer)

    def loss(self, latents: torch.Tensor, prompts: list[str], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Denoising loss for a batch: add noise → predict it from the prompt → mean squared error."""
        scheduler = self.bundle.scheduler
        latents = latents * self.bundle.family.vae_scaling_factor  # the UNet works on scaled latents
        noisy = scheduler.add_noise(latents, noise, timesteps)  # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        unet = self.bundle.unet
        prediction = unet(noisy.to(unet.dtype), timesteps, self.context(prompts).to(unet.dtype)).sample
        if self.bundle.family.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)  # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
        else:
            target = noise  # eps-prediction
        return F.mse_loss(prediction.float(), target.float())

    def current_embedding(self, name: str, step: int) -> Embedding:
        return Embedding.from_tensors(
            name, self.bundle.family, [self.vectors.detach()],
            step=step, checkpoint_hash=self.bundle.identity, checkpoint_name=self.bundle.display_name,
        )


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
    for module in (bundle.unet, bundle.text_encoder, bundle.vae):
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


def fixed_probe(examples: list[LatentExample], count: int, seed: int, num_timesteps: int):
    """A held-fixed set of (example index, noise, timestep) to measure loss comparably across steps.

    The timesteps are spread evenly over the schedule (shuffled over the examples): every noise
    level counts, and the number varies less between seeds than with random timesteps.
    """
    generator = torch.Generator().manual_seed(seed)
    picks = [i % len(examples) for i in range(count)]
    noise = [torch.randn(examples[i].mean.shape, generator=generator) for i in picks]
    spread = ((torch.arange(count) + 0.5) * num_timesteps / count).long().clamp(max=num_timesteps - 1)
    return picks, noise, spread[torch.randperm(count, generator=generator)]


def probe_prompts(template: list[str] | None, examples: list[LatentExample], token: str) -> list[str]:
    """Each example's prompt as training builds it, without augmentation: the first template line, or its caption."""
    return [build_prompt(template[0] if template else None, e.caption, token) for e in examples]


@torch.no_grad()
def probe_loss(model: TextualInversion, examples: list[LatentExample], probe, prompts: list[str]) -> float:
    picks, noise, timesteps = probe
    device = model.vectors.device
    total = 0.0
    for index, i in enumerate(picks):
        latents = examples[i].mean[None].to(device)
        total += model.loss(latents, [prompts[i]], noise[index][None].to(device), timesteps[index : index + 1].to(device)).item()
    return total / len(picks)
