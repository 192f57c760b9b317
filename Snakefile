# tiflow: preprocess → caption → cache_latents → train → evaluate.
# Rules only; every rule calls a stage program that also runs by hand (python -m stages.<name>).
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from stages.common.config import ConfigError, check_yaml_syntax, own_runs, sweep_points, validate_config
from stages.common.preflight import check_before_work
from stages.common.snakelock import defer_sigterm_handler, remove_stale_lock
from stages.common.layout import StageDirs
from stages.common.workflow import caption_inputs, dataset_inputs, model_inputs, stage_settings, to_json, train_inputs

try:
    check_yaml_syntax("config.yaml")  # Snakemake's own message for a YAML error names no line
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

configfile: "config.yaml"

try:
    own_runs(config, workflow.overwrite_configfiles)  # runs: in a --configfile replace config.yaml's instead of adding to them
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

MAIN = workflow.exec_mode.name == "DEFAULT"  # the snakemake a user started, not a cluster job's own

try:
    validate_config(config)
    if MAIN:  # the checks that read files run once, not again in every cluster job
        # trigger words, templates, model and init_from files, before any stage runs; the trigger-word checks
        # that passed are remembered, so a rerun with nothing new skips loading the tokenizer
        check_before_work(config, memo=Path(".snakemake/tiflow/preflight-passed.json"))
except ConfigError as error:
    sys.exit(f"tiflow: {error}")

if MAIN:
    defer_sigterm_handler()  # a SIGTERM must stop snakemake, never hang it (stages/common/snakelock.py)
    for lock in remove_stale_lock():
        print(f"tiflow: removed {lock}, left by a snakemake that was stopped hard (none runs in this folder now)", file=sys.stderr)

ENV = "envs/tiflow.yaml"  # the software every rule runs, for snakemake --use-conda; `make` installs the same into .venv
USES_CONDA = any(method.name == "CONDA" for method in workflow.deployment_settings.deployment_method)
PY = "python" if USES_CONDA else sys.executable  # the env's python, else the one snakemake runs in (the stages' packages)
DIRS = StageDirs(config["out_dir"])  # the out/ layout, shared with every stage
RUN = "{run}"  # Snakemake's wildcard, placed by the layout like any run name
try:
    CORES = workflow.cores  # --cores N: what the stages that use every core get
except WorkflowError:
    CORES = 1  # no --cores: snakemake --report, --lint or a cluster profile, whose set-threads decide
RUNS = list(config["runs"])

localrules: all, overview, preflight  # on a cluster, these need no job of their own

report: "report/workflow.rst"  # snakemake --report report.html: the grids, loss plots and metrics of every run


rule all:
    input:
        f"{DIRS.evaluate_root}/index.html",
        f"{DIRS.preflight}/index.html",


rule preprocess:
    input:
        dataset_inputs(config),
    output:
        manifest=f"{DIRS.preprocess}/manifest.csv",
        skipped=f"{DIRS.preprocess}/skipped.csv",
    params:
        python=PY,
        settings=stage_settings(config, "preprocess"),
    log:
        DIRS.log("preprocess"),
    threads: CORES
    conda:
        ENV
    shell:
        "{params.python} -m stages.preprocess --settings {params.settings:q} --threads {threads} --log {log:q}"


rule caption:
    input:
        manifest=rules.preprocess.output.manifest,
        models=caption_inputs(config["caption"]),  # replacing a tagger, DeepDanbooru or BLIP file re-captions
    output:
        f"{DIRS.caption}/captions.csv",
    params:
        python=PY,
        settings=stage_settings(config, "caption"),
    log:
        DIRS.log("caption"),
    threads: CORES if caption_inputs(config["caption"]) else 1
    conda:
        ENV
    shell:
        "{params.python} -m stages.caption --settings {params.settings:q} --threads {threads} --log {log:q}"


rule cache_latents:
    input:
        manifest=rules.preprocess.output.manifest,
        model=model_inputs(config),
    output:
        f"{DIRS.latents}/manifest.csv",
    params:
        python=PY,
        settings=stage_settings(config, "cache_latents"),
    log:
        DIRS.log("cache_latents"),
    threads: CORES
    resources:
        gpu=1,  # a cluster job asks for one GPU; on one machine these stages take every core (threads), so they take turns
    conda:
        ENV
    shell:
        "{params.python} -m stages.cache_latents --settings {params.settings:q} --threads {threads} --log {log:q}"


rule preflight_run:
    input:
        manifest=rules.preprocess.output.manifest,
        captions=rules.caption.output,
        model=model_inputs(config),
    output:
        f"{DIRS.preflight}/runs/{RUN}.json",
    params:
        python=PY,
        settings=lambda wildcards: stage_settings(config, "preflight", wildcards.run),
    log:
        DIRS.log(f"preflight_{RUN}"),
    threads: CORES
    resources:
        gpu=1,  # it times a few real training steps on the device training will use
    conda:
        ENV
    shell:
        "{params.python} -m stages.train --preflight --settings {params.settings:q} --run {wildcards.run:q} --log {log:q}"


rule preflight:
    input:
        runs=expand(f"{DIRS.preflight}/runs/{RUN}.json", run=RUNS),
        manifest=rules.preprocess.output.manifest,
    output:
        report=f"{DIRS.preflight}/index.html",
        facts=f"{DIRS.preflight}/preflight.json",
        aspect=report(f"{DIRS.preflight}/aspect_ratios.png", caption="report/preflight.rst", category="Pre-flight",
                      labels={"figure": "aspect ratios"}),
    params:
        python=PY,
        settings=stage_settings(config, "preflight"),
    log:
        DIRS.log("preflight"),
    conda:
        ENV
    shell:
        "{params.python} -m stages.train --preflight --settings {params.settings:q} --log {log:q}"


rule train:
    input:
        preflight=rules.preflight_run.output,  # this run's part of the pre-flight report comes first: its time, memory, warnings
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
        init_from=lambda wildcards: train_inputs(config, wildcards.run),
    output:
        embedding=f"{DIRS.train(RUN)}/{RUN}.safetensors",
        a1111=f"{DIRS.train(RUN)}/{RUN}.pt",
        loss=f"{DIRS.train(RUN)}/loss.csv",
    params:
        python=PY,
        settings=lambda wildcards: stage_settings(config, "train", wildcards.run),
    log:
        DIRS.log(f"train_{RUN}"),
    threads: CORES
    resources:
        gpu=1,  # a cluster job asks for one GPU; on one machine these stages take every core (threads), so they take turns
    conda:
        ENV
    shell:
        "{params.python} -m stages.train --settings {params.settings:q} --run {wildcards.run:q} --log {log:q}"


rule evaluate:
    input:
        embedding=rules.train.output.embedding,
        loss=rules.train.output.loss,
        images=rules.preprocess.output.manifest,  # thumbnails and crops for the per-image ranking
        latents=rules.cache_latents.output,
        captions=rules.caption.output,
        model=model_inputs(config),
    output:
        grid=report(f"{DIRS.evaluate(RUN)}/grid.png", caption="report/grid.rst", category="Runs", subcategory=RUN,
                    labels={"run": RUN, "figure": "samples"}),
        loss=report(f"{DIRS.evaluate(RUN)}/loss.png", caption="report/loss.rst", category="Runs", subcategory=RUN,
                    labels={"run": RUN, "figure": "loss"}),
        val_loss=report(f"{DIRS.evaluate(RUN)}/val_loss.csv", caption="report/val_loss.rst", category="Runs", subcategory=RUN,
                        labels={"run": RUN, "figure": "validation loss table"}),
        image_loss=report(f"{DIRS.evaluate(RUN)}/image_loss.csv", caption="report/image_loss.rst", category="Runs", subcategory=RUN,
                          labels={"run": RUN, "figure": "loss per image"}),
        metrics=report(f"{DIRS.evaluate(RUN)}/metrics.json", caption="report/metrics.rst", category="Runs", subcategory=RUN,
                       labels={"run": RUN, "figure": "metrics"}),
        report=f"{DIRS.evaluate(RUN)}/index.html",
        best=f"{DIRS.evaluate(RUN)}/best/{RUN}.safetensors",
    params:
        python=PY,
        settings=lambda wildcards: stage_settings(config, "evaluate", wildcards.run),
    log:
        DIRS.log(f"evaluate_{RUN}"),
    threads: CORES
    resources:
        gpu=1,  # a cluster job asks for one GPU; on one machine these stages take every core (threads), so they take turns
    conda:
        ENV
    shell:
        "{params.python} -m stages.evaluate --settings {params.settings:q} --run {wildcards.run:q} --log {log:q}"


rule overview:
    input:
        expand(f"{DIRS.evaluate(RUN)}/metrics.json", run=RUNS),
        expand(f"{DIRS.evaluate(RUN)}/val_loss.csv", run=RUNS),
        rules.preflight.output.report,  # the page links it; cheap to redo when it changes
    output:
        report=f"{DIRS.evaluate_root}/index.html",
        plot=report(f"{DIRS.evaluate_root}/val_loss.png", caption="report/overview.rst", category="Comparison",
                    labels={"figure": "validation loss of every run"}),
    params:
        python=PY,
        out=DIRS.evaluate_root,
        runs=" ".join(f"'{run}'" for run in RUNS),
        sweeps=to_json(sweep_points(config.get("sweeps"))),  # each sweep's runs, ranked on the page
    log:
        DIRS.log("overview"),
    conda:
        ENV
    shell:
        "{params.python} -m stages.evaluate --overview --out {params.out:q} --runs {params.runs} --sweeps {params.sweeps:q} --log {log:q}"
