"""One training step of the embedded models, split into forward + backward and the optimizer, for the two
CPU levers the training loops take: AdamW's implementation and the convolutions' memory layout.

    .venv/bin/python benchmarks/training_step.py [--steps 15] [--threads 2]

Baseline (the first row of each model) is what the loops did before: torch's default AdamW (a Python
loop of small ops per parameter tensor on the CPU) and, for the teacher, NCHW convolutions. Each row
runs the real models at the sizes params.yaml gives them, on random inputs of the loops' shapes:

  teacher  the embedded open_clip ResNet CLIP (`teacher.image_size`, `teacher.batch_size`, captions of
           its context length) with open_clip's ClipLoss;
  plm      the embedded BART as the plm stage creates it (`vlkd.plm.pretrain.create_model`, vocabulary
           `plm.vocab_size`) on `plm.batch_size` documents of `plm.max_length` / 2 tokens, BART's loss.

The optimizer is `vlkd.training.decay_groups` with the loops' betas, clipping as the loops clip. Every
variant starts from the same weights and inputs and runs in this one process, one after the other, after
warm-up steps; the table gives the mean of `--steps` steps. Nothing here reads the project's data.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlkd.config import load_params  # noqa: E402
from vlkd.training import decay_groups  # noqa: E402

WARMUP_STEPS = 3
OPTIMIZERS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def teacher_case(params, folder: Path):
    import open_clip

    from vlkd.teacher.contrastive import create_embedded_model, embedded_config

    model, _, _ = create_embedded_model(folder, torch.device("cpu"), embedded_config(params.teacher.image_size))
    size, batch = params.teacher.image_size, params.teacher.batch_size
    context = model.context_length
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(0, model.vocab_size, (batch, context))
    clip_loss = open_clip.loss.ClipLoss()

    def loss(model, channels_last: bool):
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        out = model(x, tokens)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    return model, loss, (0.9, 0.98), None


class _Vocabulary:
    """What `vlkd.plm.pretrain.create_model` reads of a tokenizer: its size and BART's special ids (the
    pretrained one's layout), so the benchmark builds the stage's own model without training a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def plm_case(params, folder: Path):
    from vlkd.plm.pretrain import create_model

    p = params.plm
    model = create_model(p, _Vocabulary(p.vocab_size))
    ids = torch.randint(4, p.vocab_size, (p.batch_size, p.max_length // 2))

    def loss(model, channels_last: bool):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    return model, loss, (0.9, 0.98), p.max_grad_norm


def time_variant(make_case, params, folder: Path, optimizer: str, channels_last: bool, steps: int) -> dict:
    torch.manual_seed(0)
    model, loss_of, betas, max_grad_norm = make_case(params, folder)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    parameters = [param for param in model.parameters() if param.requires_grad]
    adamw = torch.optim.AdamW(decay_groups(model, 0.01), lr=1e-4, betas=betas, **OPTIMIZERS[optimizer])
    compute = update = 0.0
    for step in range(WARMUP_STEPS + steps):
        started = time.perf_counter()
        loss_of(model, channels_last).backward()
        middle = time.perf_counter()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        ended = time.perf_counter()
        if step >= WARMUP_STEPS:
            compute, update = compute + middle - started, update + ended - middle
    return {"compute_ms": 1000 * compute / steps, "optimizer_ms": 1000 * update / steps,
            "parameters": sum(param.numel() for param in parameters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    cases = {
        "teacher": (teacher_case, [("for-loop", False), ("fused", False), ("for-loop", True), ("fused", True)]),
        "plm": (plm_case, [("for-loop", False), ("foreach", False), ("fused", False)]),
    }
    print(f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}, "
          f"{args.steps} steps after {WARMUP_STEPS} warm-up steps\n")
    print("| model | AdamW | layout | forward + backward ms | optimizer ms | step ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make_case, variants) in cases.items():
            baseline = None
            for optimizer, channels_last in variants:
                result = time_variant(make_case, params, Path(tmp), optimizer, channels_last, args.steps)
                step = result["compute_ms"] + result["optimizer_ms"]
                baseline = baseline or step
                layout = "channels-last" if channels_last else ("NCHW" if name == "teacher" else "-")
                print(f"| {name} ({result['parameters'] / 1e6:.1f}M) | {optimizer} | {layout} | "
                      f"{result['compute_ms']:.1f} | {result['optimizer_ms']:.1f} | {step:.1f} | "
                      f"{baseline / step:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
