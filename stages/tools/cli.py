"""`tiflow`: the tools that are not pipeline stages (the stages are `python -m stages.<name>`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _export_model(args: argparse.Namespace) -> int:
    from stages.tools.export import export_builtin

    for path in export_builtin(args.model, args.folder, args.single_file, args.half):
        print(f"wrote {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from stages.common.embedding.core import check_embedding_fits
    from stages.common.embedding.read import open_embedding_file
    from stages.tools.embedding_report import describe_embedding_file

    file = open_embedding_file(args.file)
    lines = describe_embedding_file(file)
    if args.model:
        from stages.common.models import load_model

        bundle = load_model(args.model)
        check_embedding_fits(file.embedding, bundle.family, bundle.text_widths, str(args.file))
        lines.append(f"fits:       {args.model} ({bundle.family.name}, text width {' + '.join(map(str, bundle.text_widths))})")
    print("\n".join(lines))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from stages.tools.run_list import describe_runs, load_workflow_config

    print("\n".join(describe_runs(load_workflow_config(args.config, args.configfile))))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from stages.tools.embedding_convert import convert_embedding

    for path in convert_embedding(args.file, args.to, args.output):
        print(f"wrote {path}")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from stages.tools.prompt_report import prompts_command

    return prompts_command(args.config, args.run)


EMBEDDING_FORMATS = ("safetensors", "pt", "diffusers", "png")  # = embedding_convert.EMBEDDING_WRITERS (kept light for --help)


CONVERT_FORMATS_HELP = """Read any embedding file tiflow can read and write it as FORMAT:
  safetensors  emb_params (SD1/SD2) or clip_l + clip_g (SDXL): AUTOMATIC1111/Forge, ComfyUI, kohya, diffusers
  pt           AUTOMATIC1111's dict (string_to_param ...) in torch's legacy serialization; SDXL: the bare
               {clip_g, clip_l} dict, the only SDXL .pt AUTOMATIC1111 reads
  diffusers    learned_embeds {token: [vectors, width]}: safetensors if OUT ends in .safetensors, otherwise
               a pickle (e.g. OUT.bin). SDXL writes two per-encoder files, as diffusers' own SDXL script does:
               OUT holds clip_l (load with text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) and
               OUT_2, e.g. x_2.safetensors, holds clip_g (text_encoder=pipe.text_encoder_2,
               tokenizer=pipe.tokenizer_2)
  png          AUTOMATIC1111's embedding in PNG: a text chunk plus the data in the pixels
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiflow", description="tiflow tools. The pipeline itself runs with `make run` (snakemake).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser("export-model", help="write a builtin random-weight model as a diffusers folder or an original-layout .safetensors file")
    export.add_argument("model", help="builtin:<name>, e.g. builtin:tiny-sd15, builtin:tiny-sd2-v or builtin:tiny-sdxl (SD1.x, SD2.x and SDXL)")
    export.add_argument("folder", nargs="?", type=Path, help="diffusers folder to create")
    export.add_argument("--single-file", type=Path, help="also (or only) write one .safetensors file in the original Stable Diffusion key layout")
    export.add_argument("--half", action="store_true", help="store the single file in fp16")
    export.set_defaults(handler=_export_model)

    inspect = commands.add_parser(
        "inspect",
        help="show what an embedding file holds (format, name, vectors, width, family, step, norms); exit 1 with the reason if it is refused",
        description="Read an embedding file (recognised by content, no code in it is ever run) and describe it. "
        "Exit status 0: a usable embedding; 1: refused, with one line saying why.",
    )
    inspect.add_argument("file", type=Path, help=".safetensors, AUTOMATIC1111 .pt/.bin, diffusers learned_embeds, or an AUTOMATIC1111 PNG/WebP embedding")
    inspect.add_argument("--model", help="also check that the embedding fits this model (builtin:<name>, a diffusers folder or a checkpoint file)")
    inspect.set_defaults(handler=_inspect)

    convert = commands.add_parser(
        "convert",
        help="rewrite an embedding file in another format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CONVERT_FORMATS_HELP,
    )
    convert.add_argument("file", type=Path, help="the embedding file to read")
    convert.add_argument("--to", required=True, choices=EMBEDDING_FORMATS, help="the format to write")
    convert.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="the file to write (SDXL --to diffusers also writes OUT's _2 sibling)")
    convert.set_defaults(handler=_convert)

    prompts = commands.add_parser(
        "prompts",
        help="show each image's training prompt and token ids; warn where a prompt passes 75 tokens or lacks the trigger word",
    )
    prompts.add_argument("--config", type=Path, default=Path("config.yaml"), help="the workflow's config file (default: ./config.yaml)")
    prompts.add_argument("--run", help="only this run (default: every run in runs:)")
    prompts.set_defaults(handler=_prompts)

    runs = commands.add_parser("runs", help="list every run the workflow trains, sweeps expanded, with their main settings")
    runs.add_argument("--config", type=Path, default=Path("config.yaml"), help="the workflow's config file (default: ./config.yaml)")
    runs.add_argument("--configfile", type=Path, nargs="*", default=[],
                      help="extra config files, as given to snakemake --configfile (their runs: and sweeps: replace config.yaml's)")
    runs.set_defaults(handler=_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"tiflow {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
