# tiflow: preprocess → caption → cache_latents → train → evaluate.
# Rules only; every rule calls a stage program that also runs by hand (python -m stages.<name>).
import sys

from stages.common.config import ConfigError, check_yaml_syntax, validate_config
from stages.common.preflight import check_before_work
from stages.common.snakelock import remove_stale_lock
from stages.common.workflow import dataset_inputs, evaluate_params, model_inputs, to_json, train_inputs, train_params
from stages.caption.settings import tagger_inputs  # the tagger's model and tags files, when caption.method uses it

try:
    check_yaml_syntax("config.yaml")  # Snakemake's own message for a YAML error names no line
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

configfile: "config.yaml"

try:
    validate_config(config)
    check_before_work(config)  # trigger words, templates, model and init_from files: seconds, before any stage runs
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

if workflow.exec_mode.name == "DEFAULT":  # the snakemake a user started, not a cluster job's
    for lock in remove_stale_lock():
        print(f"tiflow: removed {lock}, left by a snakemake that was stopped hard (none runs in this folder now)", file=sys.stderr)

PY = sys.executable  # the interpreter snakemake runs in, so stages see the same packages
OUT = config["out_dir"]
RUNS = list(config["runs"])

localrules: all, overview  # on a cluster, these need no job of their own


rule all:
    input:
        f"{OUT}/evaluate/index.html",


rule preprocess:
    input:
        dataset_inputs(config),
    output:
        manifest=f"{OUT}/preprocess/manifest.csv",
        skipped=f"{OUT}/preprocess/skipped.csv",
    params:
        settings=to_json(config["preprocess"]),
        images=config["dataset"]["images"],
        out=f"{OUT}/preprocess",
        cache=f"{OUT}/cache/preprocess",  # outside the outputs: survives reruns, keyed by content and settings
    log:
        f"{OUT}/logs/preprocess.log",
    threads: workflow.cores
    shell:
        "{PY} -m stages.preprocess --settings {params.settings:q} --images {params.images:q} --out {params.out:q}"
        " --cache {params.cache:q} --threads {threads} --log {log:q}"


rule caption:
    input:
        manifest=rules.preprocess.output.manifest,
        tagger=tagger_inputs(config["caption"]),  # replacing the model or its tags file re-captions
    output:
        f"{OUT}/caption/captions.csv",
    params:
        settings=to_json(config["caption"]),
        preprocessed=f"{OUT}/preprocess",
        out=f"{OUT}/caption",
        store=f"{OUT}/cache/tagger",  # tagger scores outside the outputs: survive reruns, keyed by image and model content
    log:
        f"{OUT}/logs/caption.log",
    threads: workflow.cores if tagger_inputs(config["caption"]) else 1
    shell:
        "{PY} -m stages.caption --settings {params.settings:q} --preprocessed {params.preprocessed:q} --out {params.out:q}"
        " --store {params.store:q} --threads {threads} --log {log:q}"


rule cache_latents:
    input:
        manifest=rules.preprocess.output.manifest,
        model=model_inputs(config),
    output:
        f"{OUT}/latents/manifest.csv",
    params:
        settings=to_json({"model": config["model"], "cache_latents": config["cache_latents"]}),
        flip="--flip" if config["preprocess"]["flip"] else "--no-flip",
        preprocessed=f"{OUT}/preprocess",
        out=f"{OUT}/latents",
        store=f"{OUT}/cache/latents",  # outside the outputs: survives reruns, keyed by content
    log:
        f"{OUT}/logs/cache_latents.log",
    threads: workflow.cores
    shell:
        "{PY} -m stages.cache_latents --settings {params.settings:q} {params.flip} --preprocessed {params.preprocessed:q}"
        " --out {params.out:q} --store {params.store:q} --threads {threads} --log {log:q}"


rule train:
    input:
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
        init_from=lambda wildcards: train_inputs(config, wildcards.run),
    output:
        embedding=f"{OUT}/train/{{run}}/{{run}}.safetensors",
        a1111=f"{OUT}/train/{{run}}/{{run}}.pt",
        loss=f"{OUT}/train/{{run}}/loss.csv",
    params:
        settings=lambda wildcards: train_params(config, wildcards.run),
        latents=f"{OUT}/latents",
        captions=f"{OUT}/caption",
        out=lambda wildcards: f"{OUT}/train/{wildcards.run}",
        state=lambda wildcards: f"{OUT}/cache/train/{wildcards.run}",  # resume store: survives reruns
    log:
        f"{OUT}/logs/train_{{run}}.log",
    threads: workflow.cores
    shell:
        "{PY} -m stages.train --settings {params.settings:q} --run {wildcards.run:q} --latents {params.latents:q}"
        " --captions {params.captions:q} --out {params.out:q} --state-dir {params.state:q} --log {log:q}"


rule evaluate:
    input:
        embedding=rules.train.output.embedding,
        loss=rules.train.output.loss,
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
    output:
        grid=f"{OUT}/evaluate/{{run}}/grid.png",
        loss=f"{OUT}/evaluate/{{run}}/loss.png",
        val_loss=f"{OUT}/evaluate/{{run}}/val_loss.csv",
        metrics=f"{OUT}/evaluate/{{run}}/metrics.json",
        report=f"{OUT}/evaluate/{{run}}/index.html",
        best=f"{OUT}/evaluate/{{run}}/best/{{run}}.safetensors",
    params:
        settings=lambda wildcards: evaluate_params(config, wildcards.run),
        train_dir=lambda wildcards: f"{OUT}/train/{wildcards.run}",
        latents=f"{OUT}/latents",
        captions=f"{OUT}/caption",
        out=lambda wildcards: f"{OUT}/evaluate/{wildcards.run}",
    log:
        f"{OUT}/logs/evaluate_{{run}}.log",
    threads: workflow.cores
    shell:
        "{PY} -m stages.evaluate --settings {params.settings:q} --run {wildcards.run:q} --train-dir {params.train_dir:q}"
        " --latents {params.latents:q} --captions {params.captions:q} --out {params.out:q} --log {log:q}"


rule overview:
    input:
        expand(f"{OUT}/evaluate/{{run}}/metrics.json", run=RUNS),
        expand(f"{OUT}/evaluate/{{run}}/val_loss.csv", run=RUNS),
    output:
        report=f"{OUT}/evaluate/index.html",
        plot=f"{OUT}/evaluate/val_loss.png",
    params:
        out=f"{OUT}/evaluate",
        runs=" ".join(f"'{run}'" for run in RUNS),
    log:
        f"{OUT}/logs/overview.log",
    shell:
        "{PY} -m stages.evaluate --overview --out {params.out:q} --runs {params.runs} --log {log:q}"
