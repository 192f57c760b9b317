"""`tiflow`: the tools that are not pipeline stages (the stages are `python -m stages.<name>`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _export_model(args: argparse.Namespace) -> int:
    from stages.common.export import export_builtin

    for path in export_builtin(args.model, args.folder, args.single_file, args.half):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiflow", description="tiflow tools. The pipeline itself runs with `make run` (snakemake).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser("export-model", help="write a builtin random-weight model as a diffusers folder or an original-layout .safetensors file")
    export.add_argument("model", help="builtin:<name>, e.g. builtin:tiny-sd15")
    export.add_argument("folder", nargs="?", type=Path, help="diffusers folder to create")
    export.add_argument("--single-file", type=Path, help="also (or only) write one .safetensors file in the original Stable Diffusion key layout")
    export.add_argument("--half", action="store_true", help="store the single file in fp16")
    export.set_defaults(handler=_export_model)
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
