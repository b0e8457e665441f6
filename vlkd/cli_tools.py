"""The `vlkd` commands that use a model or score one, beside the stages: `predict`, `vqa-score`,
`caption-score`."""

from __future__ import annotations

from pathlib import Path

import click

from vlkd.cli_common import quiet_transformers, reports_errors
from vlkd.config import Params


@click.command("vqa-score")
@click.option("--questions", type=click.Path(path_type=Path), required=True, help="VQA questions JSON.")
@click.option("--annotations", type=click.Path(path_type=Path), required=True, help="VQA annotations JSON.")
@click.option("--predictions", type=click.Path(path_type=Path), required=True,
              help='Results JSON: [{"question_id": ..., "answer": ...}, ...].')
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Metrics JSON to write.")
@click.option("--normalize", type=click.Choice(["official", "always"]), default="official", show_default=True,
              help="official: normalise answers only where the humans disagree (the official script); "
              "always: normalise every answer.")
@reports_errors
def vqa_score(questions: Path, annotations: Path, predictions: Path, output: Path, normalize: str) -> None:
    """The official VQA accuracy of a results file: overall, per answer type, per question type."""
    from vlkd.data.vqa_metric import score_vqa_files

    result = score_vqa_files(questions, annotations, predictions, output, normalize)
    click.echo(f"VQA accuracy {result['overall']:.2f} over {result['questions']} questions "
               f"({normalize} normalisation); metrics in {output}")


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=Path("data/model"), show_default=True,
              help="A packaged model (`vlkd package`), or a student folder with --teacher.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Predictions: .parquet or .jsonl.")
@click.option("--task", type=click.Choice(["vqa", "caption"]), default="vqa", show_default=True)
@click.option("--question", help="The question asked of every image (a .parquet/.jsonl source has its own).")
@click.option("--mode", type=click.Choice(["direct", "describe"]), help="How VQA is asked [the evaluation's first "
              "of evaluate.vqa_modes].")
@click.option("--teacher", type=click.Path(path_type=Path), help="With a bare student folder: its teacher folder.")
@click.option("--plm", type=click.Path(path_type=Path), help="With a bare student folder: the language model "
              "before distillation (describe mode).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images embedded and answered at a time (bounds memory).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.pass_obj
@reports_errors
def predict(params: Params, source: Path, model_dir: Path, output: Path, task: str, question: str | None,
            mode: str | None, teacher: Path | None, plm: Path | None, chunk_size: int, device: str,
            precision: str) -> None:
    """Answer questions about, or caption, SOURCE: a folder of images, webdataset shards, or a .parquet/.jsonl
    file of image paths and questions. An image that cannot be decoded gets an empty answer and its reason."""
    quiet_transformers()
    from vlkd.inference.asking import Asking
    from vlkd.inference.model import load_model
    from vlkd.inference.predict import predict as run_predict
    from vlkd.inference.predict import summary_path

    asking = None if teacher is None else Asking.of(params.evaluate)  # a bare student: asked as params.yaml says
    model = load_model(model_dir, device=device, precision=precision, teacher=teacher, plm=plm, asking=asking)
    summary = run_predict(model, source, output, task, mode, question, chunk_size)
    click.echo(f"{summary['answered']} of {summary['rows']} image(s) answered ({summary['not_decoded']} not "
               f"decodable) by student {summary['model']['student_sha256'][:12]}; predictions in {output}, "
               f"summary in {summary_path(output)}")


@click.command("caption-score")
@click.option("--annotations", type=click.Path(path_type=Path), required=True, help="COCO captions JSON.")
@click.option("--predictions", type=click.Path(path_type=Path), required=True,
              help='Results JSON: [{"image_id": ..., "caption": ...}, ...].')
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Metrics JSON to write.")
@reports_errors
def caption_score(annotations: Path, predictions: Path, output: Path) -> None:
    """COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE where Java allows) with pycocoevalcap."""
    from vlkd.evaluate.caption_metric import score_caption_files

    result = score_caption_files(annotations, predictions, output)
    shown = ", ".join(f"{key} {value:.4f}" for key, value in result.items() if isinstance(value, float))
    click.echo(f"{shown} over {result['images']} images; metrics in {output}")
