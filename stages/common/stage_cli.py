"""What every stage's command line shares: reading its settings, logging, turning errors into one line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from stages.common.config import ConfigError, load_config, validate_config
from stages.common.console import routed_output


# folders several stages read; each flag overrides where StageDirs puts that folder
SHARED_FOLDERS = {
    "--preprocessed": "the preprocess stage's folder (default: {out_dir}/preprocess)",
    "--latents": "the cache_latents folder (default: {out_dir}/latents)",
    "--captions": "the caption folder (default: {out_dir}/caption)",
    "--train-dir": "the run's train folder (default: {out_dir}/train/{run})",
}


def stage_parser(stage: str, description: str, reads: tuple[str, ...], writes: dict[str, str]) -> argparse.ArgumentParser:
    """A stage's command line: the settings arguments, then one flag per folder it `reads` (SHARED_FOLDERS)
    or `writes` (flag: what it is), each overriding where StageDirs puts that folder."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    add_settings_arguments(parser)
    for flag, what in [(flag, SHARED_FOLDERS[flag]) for flag in reads] + list(writes.items()):
        parser.add_argument(flag, type=Path, help=what)
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=None, help="read settings and paths from this config.yaml (default when nothing else is given: ./config.yaml)")
    source.add_argument("--settings", default=None,
                        help='the config sections this stage reads, as one JSON object (what Snakemake passes), e.g. \'{"out_dir": "out", "caption": {"method": "filename"}}\'')
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--log", type=Path, default=None,
                        help="also append everything the stage prints to this file, as plain lines (what Snakemake passes)")


def read_settings(args: argparse.Namespace, sections: tuple[str, ...]) -> dict:
    """The whole config, schema-checked with its defaults: from --settings (a JSON object of at most `sections`,
    as Snakemake passes them) or from config.yaml (by hand). Every stage reads its settings through here."""
    if args.settings is None:
        return load_config(args.config or Path("config.yaml"))
    try:
        given = json.loads(args.settings)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--settings: not valid JSON ({exc})") from None
    if not isinstance(given, dict) or set(given) - set(sections):
        found = ", ".join(sorted(given)) if isinstance(given, dict) else type(given).__name__
        raise ConfigError(f"--settings: found {found}; give a JSON object with some of these config sections: {', '.join(sections)}")
    return validate_config(given, source="--settings")


def run_stage(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse arguments, route output (--log), set up logging once, run `main`; a refused input prints one line and exits 1."""
    args = parser.parse_args(argv)
    with routed_output(getattr(args, "log", None)) as log_file:  # before logging is set up, so log records go through it too
        if log_file is not None:
            print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {parser.prog}", file=log_file.file, flush=True)
        logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        try:
            return main(args)
        except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
