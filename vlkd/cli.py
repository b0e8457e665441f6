"""`vlkd <stage>`: thin entry points over the library; params.yaml gives the defaults, flags override.

Bad input ends in one line on stderr (what, where, what to do) and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import click

from vlkd.cli_common import metrics_option, quiet_transformers, reports_errors, write_metrics
from vlkd.cli_tools import caption_score, predict, vqa_score
from vlkd.config import VARIANTS, Params, load_params, with_overrides
from vlkd.errors import VlkdError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--params", "params_file", type=click.Path(path_type=Path), default=None,
              help="params.yaml to read (default: the nearest one from the working directory upwards).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
@reports_errors
def main(ctx: click.Context, params_file: Path | None, verbose: bool) -> None:
    """vlkd: image URLs with captions in, a CLIP-distilled generative vision-language model out."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if params_file is not None and not params_file.is_file():
        raise VlkdError(f"params file {params_file} does not exist; check --params")
    ctx.obj = load_params(params_file)


@main.command()
@click.option("--output", type=click.Path(path_type=Path), help="World folder [synth.output].")
@click.option("--images", type=int, help="Training images [synth.images].")
@click.option("--seed", type=int, help="Random seed [synth.seed].")
@click.pass_obj
@reports_errors
def synth(params: Params, output: Path | None, images: int | None, seed: int | None) -> None:
    """Generate the synthetic world: images, URL list, VQA and COCO files, text corpus."""
    from vlkd.world.synth import generate_world

    world = with_overrides(params.synth, output=output, images=images, seed=seed)
    manifest = generate_world(world.output, world)
    click.echo(f"world written to {world.output} ({len(manifest['files'])} files)")


@main.command()
@click.option("--url-list", type=click.Path(path_type=Path),
              help="Parquet, csv or tsv file [download.url_list].")
@click.option("--output", type=click.Path(path_type=Path), help="Shard folder [download.output].")
@click.option("--url-col", help="Column with the image URLs [download.url_col].")
@click.option("--caption-col", help="Column with the captions [download.caption_col].")
@click.option("--captions-col", help="List column with every caption of the image, '' for none "
              "[download.captions_col].")
@click.option("--input-format", type=click.Choice(["auto", "parquet", "csv", "tsv"]),
              help="Format of the list; auto goes by the extension [download.input_format].")
@click.option("--column-names", help="For a csv/tsv without a header: its column names, comma-separated, "
              "e.g. 'caption,url' for Conceptual Captions [download.column_names].")
@click.option("--retry-failed", is_flag=True, help="Also re-attempt URLs whose earlier download failed.")
@metrics_option
@click.pass_obj
@reports_errors
def download(params: Params, url_list: Path | None, output: Path | None, url_col: str | None,
             caption_col: str | None, captions_col: str | None, input_format: str | None,
             column_names: str | None, retry_failed: bool, metrics_file: Path | None,
             run_log: Path | None) -> None:
    """Download a URL list into webdataset shards with img2dataset (incremental, resumable)."""
    started = time.perf_counter()
    from vlkd.corpus.download import download as run_download
    from vlkd.world.server import world_server

    names = [name.strip() for name in column_names.split(",")] if column_names else None
    stage = with_overrides(params.download, url_list=url_list, output=output, url_col=url_col,
                       caption_col=caption_col, captions_col=captions_col, input_format=input_format,
                       column_names=names)
    # The embedded world's list names URLs on 127.0.0.1 that only exist while its folder is served; any
    # other list is downloaded as it is.
    with world_server(stage.url_list):
        summary = run_download(stage.url_list, stage.output, stage, retry_failed=retry_failed)
    write_metrics(metrics_file, run_log, summary, started)
    click.echo(json.dumps(summary["url_list"], indent=2))
    click.echo(f"shards in {stage.output}: {summary['shards']['count']}, "
               f"{summary['shards']['samples']} samples")


@main.command()
@click.option("--output", type=click.Path(path_type=Path), help="Teacher folder [teacher.output].")
@click.option("--model", help="open_clip architecture, e.g. ViT-L-14 [teacher.model].")
@click.option("--pretrained", help="Pretrained tag (e.g. openai) or checkpoint file; without one the embedded "
              "model is trained on the shards [teacher.pretrained].")
@click.option("--shards", type=click.Path(path_type=Path), help="Shards to train on [teacher.shards].")
@click.option("--epochs", type=int, help="Training epochs [teacher.epochs].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[teacher.device]")
@metrics_option
@click.pass_obj
@reports_errors
def teacher(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """Make the teacher folder: an open_clip model, or train the embedded one on the shards."""
    started = time.perf_counter()
    from vlkd.teacher.build import METRICS, build_teacher, read_json

    stage = with_overrides(params.teacher, **flags)
    manifest = build_teacher(stage)
    write_metrics(metrics_file, run_log, read_json(stage.output / METRICS), started)
    click.echo(f"teacher {manifest['model']} (weights {manifest['weights_sha256'][:12]}) in {stage.output}")


@main.command()
@click.option("--shards", type=click.Path(path_type=Path), multiple=True,
              help="A shard folder, a quoted brace pattern ('/data/cc3m/{00000..00331}.tar') or a tar file; "
              "repeat for several [features.shards].")
@click.option("--output", type=click.Path(path_type=Path), help="Feature folder [features.output].")
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher folder [features.teacher].")
@click.option("--model", help="open_clip model name; with --pretrained, used instead of --teacher.")
@click.option("--pretrained", help="Pretrained tag or checkpoint file for --model.")
@click.option("--batch-size", type=int, help="[features.batch_size]")
@click.option("--num-workers", type=int, help="DataLoader processes decoding images [features.num_workers].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[features.device]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="[features.precision]")
@click.option("--image-tokens/--no-image-tokens", default=None, help="Also store patch tokens "
              "[features.image_tokens].")
@click.option("--token-grid", type=click.IntRange(min=1), help="Average-pool the image tokens' grid to N x N "
              "[features.token_grid].")
@click.option("--rank", type=int, envvar="RANK", default=0, show_default=True,
              help="This process's share of the shard list (torchrun sets RANK).")
@click.option("--world-size", type=int, envvar="WORLD_SIZE", default=1, show_default=True,
              help="Number of processes splitting the shard list (torchrun sets WORLD_SIZE).")
@click.option("--replace-other-teachers", is_flag=True, help="Delete feature files made by another teacher "
              "instead of stopping (the DVC stage does: a changed teacher re-embeds every shard).")
@metrics_option
@click.pass_obj
@reports_errors
def features(params: Params, rank: int, world_size: int, metrics_file: Path | None, run_log: Path | None,
             replace_other_teachers: bool, shards: tuple[Path, ...], **flags) -> None:
    """Embed every shard with the frozen teacher into Parquet (resumable, incremental)."""
    started = time.perf_counter()
    from vlkd.features.extract import features as run_features

    if shards:
        flags["shards"] = shards[0] if len(shards) == 1 else list(shards)
    stage = with_overrides(params.features, **flags)
    summary = run_features(stage, rank, world_size, replace_other_teachers)
    this_run = summary["this_run"]
    # The metrics are the folder's summary, which only a rank that found every shard done has; each rank
    # keeps its own run log, as ranks share the command line.
    if world_size > 1 and run_log is not None:
        run_log = run_log.with_name(f"{run_log.stem}.rank-{rank}-of-{world_size}{run_log.suffix}")
    write_metrics(metrics_file if this_run["folder_complete"] else None, run_log, summary, started)
    share = "" if this_run["folder_complete"] else (f" (rank {rank} of {world_size}: its shards; the rank that "
                                                    "finishes last writes summary.json)")
    click.echo(f"features in {stage.output}{share}: {this_run['shards_computed']} shard(s) computed, "
               f"{this_run['shards_skipped']} skipped, {summary['images']} images, "
               f"{summary['bad_samples']['count']} bad sample(s), {summary['unreadable_shards']['count']} "
               f"unreadable shard(s), {this_run['images_per_second']} images/s")


@main.command(name="filter")
@click.option("--features", type=click.Path(path_type=Path), help="Feature folder [filter.features].")
@click.option("--shards", type=click.Path(path_type=Path), help="The download's folder, for img2dataset's metadata "
              "[filter.shards].")
@click.option("--output", type=click.Path(path_type=Path), help="Filter folder [filter.output].")
@metrics_option
@click.pass_obj
@reports_errors
def filter_(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """Keep the corpus rows worth distilling (CLIP score, size, caption, language, duplicates); count the rest."""
    started = time.perf_counter()
    from vlkd.filter.run import filter_corpus

    stage = with_overrides(params.filter, **flags)
    summary = filter_corpus(stage)
    write_metrics(metrics_file, run_log, summary, started)
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items() if count)
    this_run = summary["this_run"]
    click.echo(f"filter in {stage.output}: {summary['kept']} of {summary['rows']} rows kept "
               f"({dropped or 'none dropped'}); {this_run['files_filtered']} file(s) filtered, "
               f"{this_run['files_reused']} reused")


@main.command()
@click.option("--output", type=click.Path(path_type=Path), help="Language-model folder [plm.output].")
@click.option("--model", help="Hub name or local directory of a BART checkpoint, e.g. facebook/bart-base; without "
              "one the embedded model is pretrained on the corpus [plm.model].")
@click.option("--corpus", type=click.Path(path_type=Path), help="Text, one document per line [plm.corpus].")
@click.option("--heldout", type=click.Path(path_type=Path), help="Held-out documents for the metrics [plm.heldout].")
@click.option("--epochs", type=int, help="[plm.epochs]")
@click.option("--seed", type=int, help="[plm.seed]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[plm.device]")
@metrics_option
@click.pass_obj
@reports_errors
def plm(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """Make the language-model folder: a BART checkpoint, or pretrain the embedded one on the corpus."""
    started = time.perf_counter()
    from vlkd.plm.build import build_plm

    quiet_transformers()
    stage = with_overrides(params.plm, **flags)
    manifest = build_plm(stage)
    write_metrics(metrics_file, run_log, manifest["metrics"], started)
    qa = manifest["metrics"].get("qa", {})
    scores = (f", text-only QA {qa['with_description']['accuracy']:.3f} (blind {qa['blind']['accuracy']:.3f})"
              if "with_description" in qa else "")
    click.echo(f"language model {manifest['name']} ({manifest['parameters']} parameters) in {stage.output}{scores}")


@main.command()
@click.option("--features", type=click.Path(path_type=Path), help="Feature folder [distill.features].")
@click.option("--plm", type=click.Path(path_type=Path), help="Language-model folder [distill.plm].")
@click.option("--output", type=click.Path(path_type=Path), help="Student folder [distill.output].")
@click.option("--init", type=click.Path(path_type=Path), help="Continue from this student [distill.init].")
@click.option("--prefix", type=click.Choice(["pooled", "patch"]), help="Visual prefix [distill.prefix].")
@click.option("--epochs", type=int, help="[distill.epochs]")
@click.option("--batch-size", type=int, help="Per rank and micro-batch [distill.batch_size].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[distill.device]")
@metrics_option
@click.pass_obj
@reports_errors
def distill(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """VLKD: distil the teacher's stored features into the language model (TTDM, ITCL, ICTI).

    Several GPUs or machines: `torchrun --standalone --nproc_per_node N -m vlkd.cli distill` (each rank reads its own
    share of the feature rows; gloo on CPU, nccl on CUDA).
    """
    started = time.perf_counter()
    from vlkd.distill.train import distill as run_distill

    quiet_transformers()
    stage = with_overrides(params.distill, **flags)
    metrics = run_distill(stage)
    if int(os.environ.get("RANK", "0")) == 0:
        write_metrics(metrics_file, run_log, metrics, started)
        click.echo(f"student in {stage.output}: {metrics['steps']} steps, final losses {metrics['final']}")


@main.command()
@click.option("--student", type=click.Path(path_type=Path), help="Student folder [evaluate.student].")
@click.option("--plm", type=click.Path(path_type=Path), help="Language model before distillation [evaluate.plm].")
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher folder [evaluate.teacher].")
@click.option("--output", type=click.Path(path_type=Path), help="Evaluation folder [evaluate.output].")
@click.option("--batch-size", type=int, help="Prompts per generation batch [evaluate.batch_size].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[evaluate.device]")
@metrics_option
@click.pass_obj
@reports_errors
def evaluate(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """Zero-shot VQA and captions of the student with controls, text retention, and an HTML report."""
    started = time.perf_counter()
    from vlkd.evaluate.run import evaluate as run_evaluate

    quiet_transformers()
    stage = with_overrides(params.evaluate, **flags)
    metrics = run_evaluate(stage)
    write_metrics(metrics_file, run_log, metrics, started)
    click.echo(f"student: {metrics['recipe']['name']}")
    for name, result in metrics.items():
        if "overall" in result:
            controls = ", ".join(f"{c} {v['overall']:.2f}" for c, v in result["controls"].items())
            click.echo(f"{name}: VQA accuracy {result['overall']:.2f} (controls: {controls})")
        elif "CIDEr" in result:
            click.echo(f"{name}: CIDEr {result['CIDEr']:.3f} (blank image {result['controls']['blank']['CIDEr']:.3f})")
    click.echo(f"report: {stage.output / 'report.html'}")


@main.command()
@click.option("--output", type=click.Path(path_type=Path), help="Model folder [package.output].")
@metrics_option
@click.pass_obj
@reports_errors
def package(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """The student, its teacher and its language model as one folder with a model card (vlkd.load_model)."""
    from vlkd.package.build import package as run_package
    from vlkd.package.build import package_metrics

    started = time.perf_counter()
    stage = with_overrides(params.package, **flags)
    model = run_package(stage)
    write_metrics(metrics_file, run_log, package_metrics(stage.output), started)
    click.echo(f"model in {stage.output} (student {model['identity']['student_sha256'][:12]}): "
               f"vlkd.load_model(\"{stage.output}\") or vlkd predict; card in {stage.output / 'README.md'}")


@main.command()
@click.option("--output", type=click.Path(path_type=Path), help="Vision-language model folder [vlm.output].")
@click.option("--model", help="Hub name or folder of a ViLT checkpoint, e.g. dandelin/vilt-b32-mlm; without one the "
              "embedded ViLT is pretrained on the shards [vlm.model].")
@click.option("--epochs", type=int, help="[vlm.epochs]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[vlm.device]")
@metrics_option
@click.pass_obj
@reports_errors
def vlm(params: Params, metrics_file: Path | None, run_log: Path | None, **flags) -> None:
    """Make the vision-language model CLIP-TD fine-tunes: a ViLT checkpoint, or pretrain the embedded one."""
    started = time.perf_counter()
    from vlkd.vlm.build import build_vlm

    quiet_transformers()
    stage = with_overrides(params.vlm, **flags)
    manifest = build_vlm(stage)
    write_metrics(metrics_file, run_log, manifest["metrics"], started)
    heldout = manifest["metrics"].get("heldout", {})
    scores = (f", held-out ITM accuracy {heldout['itm_accuracy']:.3f}, masked words {heldout['mlm_accuracy']:.3f}"
              if "itm_accuracy" in heldout else "")
    click.echo(f"vision-language model {manifest['name']} ({manifest['parameters']} parameters) in "
               f"{stage.output}{scores}")


@main.command()
@click.option("--vlm", type=click.Path(path_type=Path), help="Vision-language model folder [finetune.vlm].")
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher folder [finetune.teacher].")
@click.option("--output", type=click.Path(path_type=Path), help="Fine-tuned models and results [finetune.output].")
@click.option("--fraction", "fractions", type=float, multiple=True, help="Training fraction(s) in (0, 1] "
              "[finetune.fractions].")
@click.option("--seed", "seeds", type=int, multiple=True, help="Seed(s) [finetune.seeds].")
@click.option("--variant", "variants", type=click.Choice(list(VARIANTS)), multiple=True,
              help="Variant(s) [finetune.variants].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[finetune.device]")
@click.option("--replace-other-teachers", is_flag=True, help="Recompute cached targets made by another teacher "
              "instead of stopping (the DVC stage does: a changed teacher changes every target).")
@metrics_option
@click.pass_obj
@reports_errors
def finetune(params: Params, metrics_file: Path | None, run_log: Path | None, replace_other_teachers: bool,
             fractions: tuple[float, ...], seeds: tuple[int, ...], variants: tuple[str, ...], **flags) -> None:
    """CLIP-TD: fine-tune the vision-language model on each task with targeted distillation of the teacher,
    over the low-shot protocol (fractions x seeds x variants, and the ablations)."""
    started = time.perf_counter()
    from vlkd.finetune.run import finetune as run_finetune

    quiet_transformers()
    given = {"fractions": list(fractions) or None, "seeds": list(seeds) or None, "variants": list(variants) or None}
    stage = with_overrides(params.finetune, **flags, **given)
    metrics = run_finetune(stage, replace_other_teachers)
    write_metrics(metrics_file, run_log, metrics, started)
    for task, table in metrics.items():
        for split in ("test", "shifted"):
            if split not in table:
                continue
            for variant, cells in table[split].items():
                shown = ", ".join(f"{f}: {c['mean']:.2f}" for f, c in cells.items())
                click.echo(f"{task} {split} {variant}: {shown}")
    click.echo(f"report: {stage.output / 'report.html'}")


for command in (predict, vqa_score, caption_score):
    main.add_command(command)


if __name__ == "__main__":
    main()
