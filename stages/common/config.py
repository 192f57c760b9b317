"""config.yaml: load, validate against config.schema.yaml, fill defaults, resolve runs."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import itertools
import os
import re
from pathlib import Path

import jsonschema
import yaml
from stages.common.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config.schema.yaml"


class ConfigError(InputError):
    """A config value that is missing, unknown, of the wrong type or out of range."""


def _with_defaults(validator_class):
    """A validator that also writes each property's schema default into the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def load_schema() -> dict:
    """The parsed schema (read once per process; validation never changes it)."""
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _describe(error: jsonschema.ValidationError, source: str) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    allowed = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        if unknown and known:
            where = f"{key}." if error.absolute_path else ""
            guesses = difflib.get_close_matches(str(unknown[0]), known, n=1, cutoff=0.6)
            guess = f"; did you mean {where}{guesses[0]}?" if guesses else ""
            return f"{source}: {where}{unknown[0]}: unknown key{guess} (allowed keys here: {', '.join(known)})"
        return f"{source}: {key}: {error.message}"
    if error.validator == "pattern" and allowed:
        return f"{source}: {key}: {error.instance!r} is not allowed: {allowed}"
    if error.validator == "enum":
        return f"{source}: {key}: {error.instance!r} is not allowed; choose one of: {', '.join(map(str, error.validator_value))}"
    detail = f" ({allowed})" if allowed else ""
    return f"{source}: {key}: {error.message}{detail}"


def validate_config(config: dict, source: str = "config.yaml") -> dict:
    """Validate `config` in place, fill defaults, and return it. Raises ConfigError naming the key."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of keys (out_dir, model, dataset, ...), found {type(config).__name__}")
    swept = expand_sweeps(config, source)
    # run entries override train.*; keep them as written so schema defaults don't mask train.*
    runs_as_written = copy.deepcopy(config.get("runs"))
    schema = load_schema()
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        # the deepest error is the most specific (a oneOf/anyOf failure wraps the real reason)
        best = jsonschema.exceptions.best_match(errors)
        message = _describe(best, source)
        path = list(best.absolute_path)
        if len(path) > 1 and path[0] == "runs" and path[1] in swept:  # name the sweep the user wrote, not the run it made
            sweep = swept[path[1]]
            keys = {str(path[2])} if len(path) > 2 else set(best.instance) - set(best.schema.get("properties", {}))
            part = "grid" if keys & set(config["sweeps"][sweep]["grid"]) else "base"
            message = message.replace(f"runs.{path[1]}.", f"sweeps.{sweep}.{part}.")
        raise ConfigError(message)
    if runs_as_written is not None:
        config["runs"] = {name: dict(overrides or {}) for name, overrides in runs_as_written.items()}
    _check_learning_rates(config, source)
    _expand_home(config)
    return config


def sweep_run_name(sweep: str, point: dict) -> str:
    """A sweep run's name shows its grid values: mychar-learning_rate-0.01-vectors-2 (other characters become _)."""
    parts = [sweep] + [f"{key}-{re.sub(r'[^A-Za-z0-9.]+', '_', str(value)).strip('_') or 'none'}" for key, value in point.items()]
    return "-".join(parts)


def sweep_points(sweeps: dict) -> dict[str, dict[str, dict]]:
    """{sweep: {run name: its grid point}}, in grid order (the first key varies slowest)."""
    points = {}
    for sweep, spec in (sweeps or {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not all(isinstance(v, list) for v in spec["grid"].values()):
            continue  # the schema names the problem
        grid = spec["grid"]
        points[sweep] = {sweep_run_name(sweep, point): point
                         for point in (dict(zip(grid, values)) for values in itertools.product(*grid.values()))}
    return points


def expand_sweeps(config: dict, source: str = "config.yaml") -> dict[str, str]:
    """Add one run per grid point of each sweep to config["runs"]; return {run: sweep}.

    Each run is the sweep's base keys plus its grid values, with token: NAME, so every run of a
    sweep trains the same trigger word and their results compare on equal terms. Without a runs:
    section, a config with sweeps trains only the sweeps (not the demo run).
    """
    sweeps = config.get("sweeps")
    if not isinstance(sweeps, dict) or not sweeps:
        return {}
    runs = config.get("runs")
    if runs is None:
        runs = config["runs"] = {}
    if not isinstance(runs, dict):
        return {}  # the schema names the problem
    swept = {}
    for sweep, points in sweep_points(sweeps).items():
        base = dict(sweeps[sweep].get("base") or {})
        if "token" in base or "token" in sweeps[sweep]["grid"]:
            raise ConfigError(f"{source}: sweeps.{sweep}: token is the sweep's name ({sweep}) for every run; rename the sweep instead")
        if len(points) < len(list(itertools.product(*sweeps[sweep]["grid"].values()))):
            raise ConfigError(f"{source}: sweeps.{sweep}: two grid points get the same run name (values that differ only in "
                              "characters a file name cannot hold, or a repeated value); make each value distinct")
        for name, point in points.items():
            entry = {**base, **point, "token": sweep}
            if runs.get(name) == entry and name not in swept:  # expanded by an earlier validation of this config
                swept[name] = sweep
                continue
            if name in runs or name in swept:
                raise ConfigError(f"{source}: sweeps.{sweep}: the grid point {point} is named {name}, which is already a run; "
                                  "rename the sweep or the run")
            runs[name] = entry
            swept[name] = sweep
    return swept


RUN_SECTIONS = ("runs", "sweeps")  # what an extra config file defines on its own instead of adding to


def own_runs(config: dict, extra_files: list[str | Path]) -> dict:
    """Give the runs and sweeps of extra config files (snakemake --configfile) precedence over the workflow's.

    Snakemake merges a --configfile into config.yaml key by key, so a file that lists only
    `runs: {mine: ...}` would also train config.yaml's runs. When any extra file has runs: or
    sweeps:, those two sections come from the extra files alone (a later file's run replaces an
    earlier one's of the same name); every other section still merges as Snakemake does.
    """
    given = []
    for path in extra_files:
        check_yaml_syntax(path)
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
        if isinstance(data, dict):
            given.append(data)
    if not any(section in data for data in given for section in RUN_SECTIONS):
        return config
    for section in RUN_SECTIONS:
        merged = {}
        for data in given:
            merged.update(data.get(section) or {})
        config[section] = merged
    if not config["sweeps"]:
        del config["sweeps"]
    return config


_PATH_KEYS = [("out_dir",), ("dataset", "images"), ("model", "path"), ("caption", "tagger", "model"), ("caption", "tagger", "tags"),
              ("caption", "deepbooru", "model"), ("caption", "blip", "model")]
_RUN_PATH_KEYS = ("init_from", "template")


def _expand_home(config: dict) -> None:
    """`~/data/cat` means the home folder, as in a shell: paths are expanded once, here, for every stage."""
    def expand(section: dict, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key].startswith("~"):
            section[key] = os.path.expanduser(section[key])

    for *parents, key in _PATH_KEYS:
        section = config
        for parent in parents:
            section = section.get(parent, {}) if isinstance(section, dict) else {}
        expand(section, key)
    for section in [config.get("train", {})] + list((config.get("runs") or {}).values()):
        for key in _RUN_PATH_KEYS:
            expand(section, key)


def _check_learning_rates(config: dict, source: str) -> None:
    from stages.common.schedule import parse_learning_rate  # local: schedule imports nothing from here

    for key, settings in [("train", config["train"])] + [(f"runs.{n}", s) for n, s in config["runs"].items()]:
        if "learning_rate" in settings:
            try:
                parse_learning_rate(settings["learning_rate"])
            except ValueError as exc:
                raise ConfigError(f"{source}: {key}.learning_rate: {exc}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as 'line L, column C: what is wrong', the way an editor points at it."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(part for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part) or str(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def check_yaml_syntax(path: str | Path) -> None:
    """Raise ConfigError naming the line of a YAML syntax error in `path` (a missing file is left to the caller)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_problem(exc)}") from None


def load_config(path: str | Path) -> dict:
    """Read and validate a config.yaml. Missing file or bad YAML → ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; copy config.yaml from the repository and edit it") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_problem(exc)}") from None
    return validate_config(raw, source=str(path))


def run_settings(config: dict, run: str) -> dict:
    """The settings of one run: train.* defaults overridden by runs.<run>, plus its trigger word."""
    if run not in config["runs"]:
        raise ConfigError(f"runs: no run named {run!r}; runs defined: {', '.join(config['runs'])}")
    settings = dict(config["train"])
    for key, value in config["runs"][run].items():
        nested_default = settings.get(key)
        # a run's preview: {seed: 3} changes the seed and keeps the other preview defaults
        settings[key] = {**nested_default, **value} if isinstance(value, dict) and isinstance(nested_default, dict) else value
    settings.setdefault("token", run)
    settings["name"] = run
    return settings


def section_properties(section: str) -> dict:
    """The schema's properties of a top-level section (following a $ref), e.g. section_properties("train")."""
    schema = load_schema()
    node = schema["properties"][section]
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node["properties"]


def section_record_values(record, values: dict, where: str, section: str) -> dict:
    """The constructor arguments of a settings record from a schema-checked section, the same way in every stage.

    A key the record does not know is refused; a key the schema leaves without a default (an
    optional path, say) is None when absent; anything else missing means the section did not
    come through validate_config, which is a programming error worth a clear message.
    """
    names = [f.name for f in dataclasses.fields(record)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key (allowed keys here: {', '.join(sorted(names))})")
    optional = {key for key, spec in section_properties(section).items() if "default" not in spec}
    missing = [name for name in names if name not in values and name not in optional]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing; settings must come from validate_config, which fills the schema's defaults")
    return {name: values.get(name) for name in names}
