"""python -m stages.train: train one run's embedding (see --help)."""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from stages.common.config import run_settings
from stages.common.errors import InputError
from stages.common.families import clip_skip_warning, resolution_warning
from stages.common.paths import BUILTIN_PREFIX
from stages.common.layout import StageDirs, frame_size
from stages.common.stage_cli import read_settings, run_stage, stage_parser
from stages.common.workflow import STAGE_SECTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("train", "Train a Textual Inversion embedding from cached latents and captions; write {run}.safetensors, "
                          "{run}.pt, steps/ and loss.csv. Ctrl-C or SIGTERM saves everything; running again resumes.",
                          ("--latents", "--captions"), {
                              "--out": "output folder (default: {out_dir}/train/{run})",
                              "--state-dir": "resume store for this run (default: {out_dir}/cache/train/{run})"})
    parser.add_argument("--run", help="the run (embedding name) in runs: to train")
    parser.add_argument("--preflight", action="store_true",
                        help="instead: the pre-flight report ({out_dir}/preflight): with --run, that run's part (a few real steps "
                             "timed, its token budget and warnings); without, the page from every run's part")
    return parser


def preflight(config: dict, run: str | None) -> int:
    """The pre-flight report. With a run: its part ({out_dir}/preflight/runs/{run}.json: measured time and memory per
    step, token budget, buckets, warnings), which its training waits for. Without: the page, from every run's part."""
    import json

    from stages.common.files import write_text_atomic
    from stages.train.preflight_page import assemble_preflight, write_preflight_page

    dirs, model = StageDirs(config["out_dir"]), config["model"]
    log = logging.getLogger("stages.train")

    def part(name: str) -> dict:
        target = dirs.preflight / "runs" / f"{name}.json"
        if run is None and target.is_file():  # the page alone: no model, no torch
            return json.loads(target.read_text(encoding="utf-8"))
        from stages.common.models import load_model
        from stages.train.preflight_report import run_preflight
        from stages.train.step_timing import measure_steps

        facts = run_preflight(config, name, lambda: load_model(model["path"], model["family"]), measure_steps, dirs.preflight_cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(facts, indent=2) + "\n")
        timing = facts["timing"]
        print(f"pre-flight: {name}: {timing['seconds_per_step']:.3f} s/step on {timing['device']}, peak memory "
              f"{timing['peak_memory_bytes'] / 2**30:.2f} GiB; {facts['steps']} steps ≈ {facts['estimated_training_seconds']:.0f} s")
        for warning in facts["warnings"]:
            log.warning(warning)
        return facts

    if run is not None:
        part(run)
        return 0
    page = write_preflight_page(dirs.preflight, assemble_preflight(config, {name: part(name) for name in config["runs"]}))
    print(f"pre-flight: report in {page}")
    return 0


def main(args: argparse.Namespace) -> int:
    if not args.preflight and not args.run:
        raise InputError("give --run RUN (the run to train), or --preflight")
    if args.preflight:
        return preflight(read_settings(args, STAGE_SECTIONS["preflight"]), args.run)
    config = read_settings(args, STAGE_SECTIONS["train"])
    settings, model_section, dirs = run_settings(config, args.run), config["model"], StageDirs(config["out_dir"])
    paths = {"latents": args.latents or dirs.latents, "captions": args.captions or dirs.caption,
             "out": args.out or dirs.train(args.run), "state": args.state_dir or dirs.train_state(args.run)}
    from stages.common.models import load_model
    from stages.common.latents import load_examples, split_validation
    from stages.train.interrupt import TrainingInterrupted
    from stages.train.outputs import RunOutputs
    from stages.train.preview import make_previewer
    from stages.train.progress import ProgressReporter
    from stages.train.resume import resume_key
    from stages.common.textual_inversion import starting_point
    from stages.train.settings import TrainSettings
    from stages.train.trainer import NonFiniteLoss, train_embedding

    train_settings = TrainSettings.from_section(settings, args.run, model_section["clip_skip"])
    bundle = load_model(model_section["path"], model_section["family"])
    warnings = [clip_skip_warning(bundle.family, model_section["clip_skip"])]
    if not str(model_section["path"]).startswith(BUILTIN_PREFIX):  # the builtins are random-weight models, trained small on purpose
        warnings.append(resolution_warning(bundle.family, frame_size(config["preprocess"]["size"])))
    for warning in filter(None, warnings):
        logging.getLogger("stages.train").warning(warning)
    examples, held_out = split_validation(load_examples(paths["latents"], paths["captions"]), train_settings.validation_split)
    if held_out:
        print(f"train: {args.run}: {len(held_out)} of {len(examples) + len(held_out)} latents held out for validation "
              f"(validation_split {train_settings.validation_split}): {', '.join(sorted({e.image for e in held_out}))}")
    start_vectors, start_step = starting_point(bundle, train_settings.init_text, train_settings.init_from, train_settings.vectors)
    state_dir = paths["state"] / resume_key(settings, bundle.identity, bundle.family.name, model_section["clip_skip"], paths["latents"] / "manifest.csv", paths["captions"] / "captions.csv")
    previewer = make_previewer(bundle, train_settings.preview, train_settings.token, frame_size(config["preprocess"]["size"]),
                               RunOutputs(paths["out"], args.run)) \
        if train_settings.preview_every else None
    reporter = ProgressReporter(f"train {args.run}",
                                paths["out"] / "tensorboard" if train_settings.tensorboard else None)
    try:
        with logging_redirect_tqdm():  # log lines go above the bar instead of through it
            result = train_embedding(bundle, examples, train_settings, paths["out"], state_dir, start_vectors, start_step, reporter, previewer)
    except TrainingInterrupted as stopped:
        reporter.close()
        print(f"train: {args.run} {stopped}", file=sys.stderr)
        return 143 if stopped.signal_name == "SIGTERM" else 129 if stopped.signal_name == "SIGHUP" else 130
    except NonFiniteLoss as error:
        reporter.close()
        print(f"train: {args.run}: {error}", file=sys.stderr)
        return 1
    reporter.close()
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(f"train: {args.run} done at step {result.embedding.step}{resumed}; loss on fixed noise {result.probe_loss_start:.4f} → "
          f"{result.probe_loss_end:.4f}; wrote {paths['out'] / (args.run + '.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))
