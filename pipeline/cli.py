"""The `t2i` command."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, load_config
from pipeline.markers import CONFIG_ERROR_EXIT_CODE, StageError


def run_stage(stage: str, cfg) -> int:
    from pipeline.runs import run_stage as run  # torch: only for the commands that compute

    return run(stage, cfg)


def _shards_build(args: argparse.Namespace) -> int:
    from pipeline.registry import load_stage

    shards = load_stage("shards")
    overrides = [f"out_dir={args.out}", *args.overrides]
    if args.folder:
        overrides += ["source=folder", f"folder={args.folder}"]
    elif args.table:
        overrides += ["source=table", f"table={args.table}"]
    return run_stage("shards", load_config(shards.Config, args.config, overrides))


def _shards_stats(args: argparse.Namespace) -> int:
    from pipeline.data.stats import format_stats, shard_stats

    stats = shard_stats(args.pattern, resolution=args.resolution, num_workers=args.workers)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def _stage(args: argparse.Namespace) -> int:
    from pipeline.registry import load_stage

    return run_stage(args.stage, load_config(load_stage(args.stage).Config, args.config, args.overrides))


def _train(args: argparse.Namespace) -> int:
    """One stage, under torchrun when its launch config asks for several processes."""
    import os
    import subprocess

    from pipeline.launch.local import stage_command
    from pipeline.registry import load_stage

    cfg = load_config(load_stage(args.stage).Config, args.config, args.overrides)  # errors before any process starts
    launch = getattr(cfg, "launch", None)
    if launch is None or launch.nproc_per_node == 1 or "LOCAL_RANK" in os.environ:
        return run_stage(args.stage, cfg)
    return subprocess.call(stage_command(args.stage, args.config, args.overrides, cfg))


def _check_from(args: argparse.Namespace) -> None:
    if args.discard and not args.from_stage:
        raise ValueError("--discard deletes the folders of the stages --from STAGE starts again: give --from too")


def _run(args: argparse.Namespace) -> int:
    from pipeline.launch.local import run_pipeline

    _check_from(args)
    return run_pipeline(args.pipeline, from_stage=args.from_stage, jobs=args.jobs, discard=args.discard)


def _submit(args: argparse.Namespace) -> int:
    from pipeline.launch.slurm import submit

    _check_from(args)
    return submit(args.pipeline, dry_run=args.dry_run, from_stage=args.from_stage, discard=args.discard)


def _status(args: argparse.Namespace) -> int:
    from pipeline.launch.slurm import print_status

    return print_status(args.run)


def _cancel(args: argparse.Namespace) -> int:
    from pipeline.launch.slurm import cancel

    return cancel(args.run)


def _sample(args: argparse.Namespace) -> int:
    from pipeline.registry import load_stage

    given = [f"{key}={json.dumps(value)}" for key, value in (("run", args.run), ("captions", args.captions),
                                                              ("out_dir", args.out))]  # JSON is YAML: any text stays text
    return run_stage("sample", load_config(load_stage("sample").Config, args.config, [*given, *args.overrides]))


def _export(args: argparse.Namespace) -> int:
    from pipeline.registry import load_stage
    from pipeline.runs import stage_of

    stage = stage_of(args.run)
    if not stage:
        raise FileNotFoundError(f"{args.run}: not a run folder (no config.yaml saying which stage made it)")
    module = load_stage(stage)
    if not callable(getattr(module, "export", None)):
        raise ValueError(f"stage {stage!r} has no export; the ldm stage exports to diffusers")
    module.export(args.run, args.format, args.out)
    return 0


def _describe(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from pipeline.describe import describe, format_report
    from pipeline.registry import load_stage

    if not Path(args.config).is_file():  # before the stage named by its folder: that name means nothing then
        raise FileNotFoundError(f"{args.config}: no such config file")
    stage = args.stage or Path(args.config).parent.name
    module = load_stage(stage)
    # describing needs no data, output folder or input stages
    placeholders = {"trainer": {"out_dir": "(not used)"}, "data": {"shards": "(not used)"}}
    placeholders |= {name: "(not used)" for name in ("dvae", "autoencoder") if name in {f.name for f in fields(module.Config)}}
    cfg = load_config(module.Config, args.config, args.overrides, base=placeholders)
    print(format_report(stage, describe(module, cfg)))
    return 0


def _add_from_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_stage", metavar="STAGE",
                        help="start STAGE and everything after it again; their folders are kept as STAGE.old-N")
    parser.add_argument("--discard", action="store_true",
                        help="with --from: delete those folders instead of keeping them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="Train text-to-image models as a pipeline of stages.")
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("shards", help="write or inspect webdataset shards").add_subparsers(
        dest="shards_command", required=True)
    build = shards.add_parser("build", help="write shards from the shapes generator, a folder or a table",
                              description="Writes NNNNN.tar shards (KEY.jpg, KEY.txt, KEY.json) and sizes.json. "
                                          "Without --folder or --table, generates the synthetic shapes data set; "
                                          "KEY=VALUE overrides set any key of stages/shards.py's ShardsConfig "
                                          "(count=5000 resolution=128 seed=1 samples_per_shard=500).")
    build.add_argument("--out", required=True, help="output folder")
    source = build.add_mutually_exclusive_group()
    source.add_argument("--folder", help="folder of images with .txt caption sidecars")
    source.add_argument("--table", help="CSV or parquet file with image paths and captions")
    build.add_argument("-c", "--config", help="a YAML ShardsConfig")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    build.set_defaults(handler=_shards_build)

    stats = shards.add_parser("stats", help="read shards through the training loader and report on them")
    stats.add_argument("pattern", help="shard pattern, e.g. 'data/{00000..00099}.tar', a folder, or pipe:/http URLs")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--resolution", type=int, default=64)
    stats.add_argument("--workers", type=int, default=2)
    stats.set_defaults(handler=_shards_stats)

    stage = commands.add_parser("stage", help="run one stage of any kind (what `t2i run` starts)")
    stage.add_argument("stage", help="stage name, e.g. shards, vae")
    stage.add_argument("-c", "--config", help="the stage's YAML config")
    stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    stage.set_defaults(handler=_stage)

    train = commands.add_parser("train", help="train one stage (under torchrun when launch.nproc_per_node > 1)")
    train.add_argument("stage", help="stage name, e.g. vae, cvae, or a module path of your own stage")
    train.add_argument("-c", "--config", help="the stage's YAML config")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(handler=_train)

    run = commands.add_parser("run", help="run a pipeline's stages on this machine")
    run.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipelines/demo.yaml")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run up to N independent stages at once, each on its own share of the CPU cores")
    _add_from_options(run)
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help="submit a pipeline's stages as SLURM jobs, chained by dependency")
    submit.add_argument("pipeline", help="pipeline YAML")
    submit.add_argument("--dry-run", action="store_true", help="print the job scripts; submit nothing")
    _add_from_options(submit)
    submit.set_defaults(handler=_submit)

    status = commands.add_parser("status", help="one line per stage of a submitted run")
    status.add_argument("run", help="the run folder, e.g. runs/demo")
    status.set_defaults(handler=_status)

    cancel = commands.add_parser("cancel", help="cancel a submitted run's jobs")
    cancel.add_argument("run", help="the run folder, e.g. runs/demo")
    cancel.set_defaults(handler=_cancel)

    sample = commands.add_parser(
        "sample", help="images from captions with a trained generative stage (dalle, pixelcnn, ldm)",
        description="KEY=VALUE overrides set any key of stages/sample.py's Config: shared ones (images_per_caption=8 "
                    "seed=1 batch_size=16 clip_checkpoint=PATH candidates=4 device=cpu) and the family's sampling "
                    "options in its section (dalle.top_k=32 dalle.guidance_scale=2, pixelcnn.top_run=RUN, "
                    "ldm.scheduler=ddim ldm.steps=50 ldm.negative_caption=...).")
    sample.add_argument("run", help="a run folder of a generative stage, or one of its checkpoints/step-N folders "
                                    "(written by the accelerate back end)")
    sample.add_argument("--captions", required=True, help="a text file (one caption a line), one caption, "
                                                          "or heldout:N for N held-out shapes captions")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("-c", "--config", help="a YAML sample config")
    sample.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    sample.set_defaults(handler=_sample)

    export = commands.add_parser("export", help="a trained run in another library's format (ldm: a diffusers pipeline)")
    export.add_argument("run", help="a run folder of a stage that exports, e.g. runs/ldm-demo/ldm")
    export.add_argument("--format", required=True, choices=["diffusers"])
    export.add_argument("out", help="a new folder for the export")
    export.set_defaults(handler=_export)

    describe = commands.add_parser("describe", help="a training stage's parameters, FLOPs and memory per GPU")
    describe.add_argument("config", help="a stage config, e.g. configs/dalle/12B.yaml")
    describe.add_argument("--stage", help="the stage (default: the config's folder name)")
    describe.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    describe.set_defaults(handler=_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    # KEY=VALUE overrides may stand before or after options: argparse only collects one run of them.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"t2i: config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except (FileNotFoundError, ValueError) as error:
        print(f"t2i: error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except StageError as error:
        print(f"t2i: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
