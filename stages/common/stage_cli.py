"""What every stage's command line shares: reading its settings, logging, turning errors into one line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from stages.common.config import ConfigError, load_config, validate_config


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=None, help="read settings and paths from this config.yaml (default when nothing else is given: ./config.yaml)")
    source.add_argument("--settings", default=None, help="this stage's config section as JSON (what Snakemake passes)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def load_full_config(args: argparse.Namespace) -> dict:
    return load_config(args.config or Path("config.yaml"))


def section_from_json(section: str, text: str) -> dict:
    """Validate a section given as JSON exactly as it would be inside config.yaml."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--settings: not valid JSON ({exc})") from None
    return validate_config({section: data}, source="--settings")[section]


def run_stage(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging once, run `main`; a refused input prints one line and exits 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
