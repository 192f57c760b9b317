"""Trainer step speed and peak memory against a bare loop on the same model and batch.

The bare loop is the floor any TI trainer can reach: a frozen UNet forward+backward into one
small trainable tensor (the text context itself), AdamW on it. tiflow's step adds the text
encoder forward/backward, prompt handling and logging; the target is within 10%.

Speed: the two loops alternate step by step in one process on the same UNet, so background
load on a shared machine hits both alike. Peak memory: each loop in its own process. Usage:
    python bench/bench_train.py [--models tiny-sd15 small-sd15 tiny-sdxl] [--size 512] [--batch 1] [--steps 20]
Full SDXL on a GPU: python bench/bench_train.py --models sdxl --size 1024 --steps 10 --options precision=bf16 gradient_checkpointing
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _examples(count: int, latent_side: int):
    from stages.common.latents import LatentExample

    generator = torch.Generator().manual_seed(0)
    return [LatentExample(f"img{i}.png", torch.randn(4, latent_side, latent_side, generator=generator),
                          torch.full((4, latent_side, latent_side), -6.0), "a red toy on a green background") for i in range(count)]


def bare_loop(unet, scheduler, batch: int, size: int, device):
    """One step of the floor any TI trainer can reach: frozen UNet forward+backward into a trainable context, AdamW.

    SDXL's UNet also takes a pooled text embedding and size ids; the bare loop gives it fixed ones.
    """
    context = torch.nn.Parameter(torch.randn(batch, 77, unet.config.cross_attention_dim, device=device) * 0.1)
    optimizer = torch.optim.AdamW([context], lr=1e-3)
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled_width, device=device, dtype=unet.dtype),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=unet.dtype)}

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        prediction = unet(scheduler.add_noise(latents, noise, t).to(unet.dtype), t, context.to(unet.dtype), **extra).sample
        torch.nn.functional.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_bare(model: str, size: int, batch: int, warmup: int, steps: int) -> dict:
    from stages.common.models import load_model

    from stages.common.textual_inversion import pick_device, resolve_precision

    bundle = load_model(f"builtin:{model}")
    device = pick_device()  # where tiflow would train, in the dtype precision: auto gives it
    unet, scheduler = bundle.unet.to(device, resolve_precision("auto", device)), bundle.scheduler
    bare_step = bare_loop(unet, scheduler, batch, size, device)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        bare_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return {"seconds_per_step": sorted(times)[len(times) // 2]}


def _trainer(model: str, size: int, batch: int, warmup: int, steps: int, option: str = ""):
    """tiflow's Trainer on 16 random latents; `option` is e.g. "gradient_checkpointing" or "precision=bf16"."""
    import tempfile

    from stages.common.models import load_model
    from stages.train.outputs import RunOutputs
    from stages.train.resume import ResumeStore
    from stages.train.settings import TrainSettings
    from stages.train.trainer import Trainer

    overrides = {}
    if option:
        key, _, value = option.partition("=")
        overrides[key] = value if value else True
    settings = TrainSettings.from_schema(name="benchtok", token="benchtok", init_text="toy", vectors=4, steps=warmup + steps,
                             batch_size=batch, save_every=0, learning_rate=1e-3, **overrides)
    return Trainer(load_model(f"builtin:{model}"), _examples(16, size // 8), settings,
                   RunOutputs(Path(tempfile.mkdtemp()), "benchtok"), ResumeStore(None))


def measure_tiflow(model: str, size: int, batch: int, warmup: int, steps: int, option: str = "") -> dict:
    trainer = _trainer(model, size, batch, warmup, steps, option)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return {"seconds_per_step": sorted(times)[len(times) // 2]}


def measure_interleaved(model: str, size: int, batch: int, warmup: int, steps: int, option: str = "") -> dict:
    """Alternate one bare step and one tiflow step on the same UNet, so background load hits both alike."""
    trainer = _trainer(model, size, batch, warmup, steps, option)
    unet, scheduler, device = trainer.bundle.unet, trainer.bundle.scheduler, trainer.device
    bare_step = bare_loop(unet, scheduler, batch, size, device)

    bare, ours = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        bare_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        middle = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            bare.append(middle - started)
            ours.append(time.perf_counter() - middle)
    median = lambda values: sorted(values)[len(values) // 2]
    return {"bare": median(bare), "tiflow": median(ours)}


def child(args) -> None:
    if args.variant.startswith("interleaved"):
        result = measure_interleaved(args.model, args.size, args.batch, args.warmup, args.steps, args.variant.partition(":")[2])
    elif args.variant == "bare":
        result = measure_bare(args.model, args.size, args.batch, args.warmup, args.steps)
    else:
        result = measure_tiflow(args.model, args.size, args.batch, args.warmup, args.steps, args.variant.partition(":")[2])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():  # on a GPU the memory that matters is the device's
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd15", "small-sd15"])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--options", nargs="*", default=[],
                        help="also time tiflow with each option against plain tiflow: gradient_checkpointing, channels_last, compile, precision=bf16")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, batch {args.batch}, median of {args.steps} steps")
    print(f"{'model':<12} {'bare s/step':>12} {'tiflow s/step':>14} {'ratio':>7} {'bare MB':>9} {'tiflow MB':>10} {'ratio':>7}")
    def run(variant: str, model: str) -> dict:
        command = [sys.executable, __file__, "--variant", variant, "--model", model, "--size", str(args.size),
                   "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(output.strip().splitlines()[-1])

    for model in args.models:
        timed = run("interleaved", model)  # speed: both loops alternate in one process
        bare, ours = run("bare", model), run("tiflow", model)  # memory: one process each
        memory = "peak_gpu_mb" if "peak_gpu_mb" in bare else "peak_rss_mb"  # GPU memory on a GPU, host RSS otherwise
        bare_mem, ours_mem = bare[memory], ours[memory]
        print(f"{model:<12} {timed['bare']:>12.4f} {timed['tiflow']:>14.4f} {timed['tiflow'] / timed['bare']:>7.3f} "
              f"{bare_mem:>9.0f} {ours_mem:>10.0f} {ours_mem / bare_mem:>7.3f}" + ("  (GPU MB)" if memory == "peak_gpu_mb" else ""))
        for option in args.options:
            with_option = run(f"interleaved:{option}", model)
            print(f"  {model} with {option}: tiflow {with_option['tiflow']:.4f} s/step vs bare {with_option['bare']:.4f} "
                  f"(same options on both) = {with_option['tiflow'] / timed['tiflow']:.3f}x plain tiflow")


if __name__ == "__main__":
    main()
