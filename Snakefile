# tiflow: preprocess → caption → cache_latents → train → evaluate.
# Rules only; every rule calls a stage program that also runs by hand (python -m stages.<name>).
import sys

from stages.common.config import ConfigError, check_yaml_syntax, validate_config
from stages.common.preflight import check_before_work
from stages.common.snakelock import defer_sigterm_handler, remove_stale_lock
from stages.common.layout import StageDirs
from stages.common.workflow import dataset_inputs, model_inputs, stage_settings, tagger_inputs, train_inputs

try:
    check_yaml_syntax("config.yaml")  # Snakemake's own message for a YAML error names no line
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

configfile: "config.yaml"

MAIN = workflow.exec_mode.name == "DEFAULT"  # the snakemake a user started, not a cluster job's own

try:
    validate_config(config)
    if MAIN:  # the checks that read files run once, not again in every cluster job
        check_before_work(config)  # trigger words, templates, model and init_from files: seconds, before any stage runs
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

if MAIN:
    defer_sigterm_handler()  # a SIGTERM must stop snakemake, never hang it (stages/common/snakelock.py)
    for lock in remove_stale_lock():
        print(f"tiflow: removed {lock}, left by a snakemake that was stopped hard (none runs in this folder now)", file=sys.stderr)

PY = sys.executable  # the interpreter snakemake runs in, so stages see the same packages
DIRS = StageDirs(config["out_dir"])  # the out/ layout, shared with every stage
RUN = "{run}"  # Snakemake's wildcard, placed by the layout like any run name
RUNS = list(config["runs"])

localrules: all, overview  # on a cluster, these need no job of their own


rule all:
    input:
        f"{DIRS.evaluate_root}/index.html",


rule preprocess:
    input:
        dataset_inputs(config),
    output:
        manifest=f"{DIRS.preprocess}/manifest.csv",
        skipped=f"{DIRS.preprocess}/skipped.csv",
    params:
        settings=stage_settings(config, "preprocess"),
    log:
        DIRS.log("preprocess"),
    threads: workflow.cores
    shell:
        "{PY} -m stages.preprocess --settings {params.settings:q} --threads {threads} --log {log:q}"


rule caption:
    input:
        manifest=rules.preprocess.output.manifest,
        tagger=tagger_inputs(config["caption"]),  # replacing the model or its tags file re-captions
    output:
        f"{DIRS.caption}/captions.csv",
    params:
        settings=stage_settings(config, "caption"),
    log:
        DIRS.log("caption"),
    threads: workflow.cores if tagger_inputs(config["caption"]) else 1
    shell:
        "{PY} -m stages.caption --settings {params.settings:q} --threads {threads} --log {log:q}"


rule cache_latents:
    input:
        manifest=rules.preprocess.output.manifest,
        model=model_inputs(config),
    output:
        f"{DIRS.latents}/manifest.csv",
    params:
        settings=stage_settings(config, "cache_latents"),
    log:
        DIRS.log("cache_latents"),
    threads: workflow.cores
    shell:
        "{PY} -m stages.cache_latents --settings {params.settings:q} --threads {threads} --log {log:q}"


rule train:
    input:
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
        init_from=lambda wildcards: train_inputs(config, wildcards.run),
    output:
        embedding=f"{DIRS.train(RUN)}/{RUN}.safetensors",
        a1111=f"{DIRS.train(RUN)}/{RUN}.pt",
        loss=f"{DIRS.train(RUN)}/loss.csv",
    params:
        settings=lambda wildcards: stage_settings(config, "train", wildcards.run),
    log:
        DIRS.log(f"train_{RUN}"),
    threads: workflow.cores
    shell:
        "{PY} -m stages.train --settings {params.settings:q} --run {wildcards.run:q} --log {log:q}"


rule evaluate:
    input:
        embedding=rules.train.output.embedding,
        loss=rules.train.output.loss,
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
    output:
        grid=f"{DIRS.evaluate(RUN)}/grid.png",
        loss=f"{DIRS.evaluate(RUN)}/loss.png",
        val_loss=f"{DIRS.evaluate(RUN)}/val_loss.csv",
        metrics=f"{DIRS.evaluate(RUN)}/metrics.json",
        report=f"{DIRS.evaluate(RUN)}/index.html",
        best=f"{DIRS.evaluate(RUN)}/best/{RUN}.safetensors",
    params:
        settings=lambda wildcards: stage_settings(config, "evaluate", wildcards.run),
    log:
        DIRS.log(f"evaluate_{RUN}"),
    threads: workflow.cores
    shell:
        "{PY} -m stages.evaluate --settings {params.settings:q} --run {wildcards.run:q} --log {log:q}"


rule overview:
    input:
        expand(f"{DIRS.evaluate(RUN)}/metrics.json", run=RUNS),
        expand(f"{DIRS.evaluate(RUN)}/val_loss.csv", run=RUNS),
    output:
        report=f"{DIRS.evaluate_root}/index.html",
        plot=f"{DIRS.evaluate_root}/val_loss.png",
    params:
        out=DIRS.evaluate_root,
        runs=" ".join(f"'{run}'" for run in RUNS),
    log:
        DIRS.log("overview"),
    shell:
        "{PY} -m stages.evaluate --overview --out {params.out:q} --runs {params.runs} --log {log:q}"
