"""What the stages that train or run a model share: the device, AdamW's decay groups, the schedule."""

from __future__ import annotations

import math
import os

import torch

from vlkd.errors import VlkdError


def resolve_device(requested: str, setting: str) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is bad input for `setting`."""
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise VlkdError(f"{setting} is cuda but torch sees no CUDA device; use auto or cpu")
    else:
        device = torch.device(requested)
    if device.type == "cuda":
        deterministic_cuda()
    return device


def deterministic_cuda() -> None:
    """The same inputs give the same weights on the same GPU model: cuDNN without autotuning, cuBLAS with
    a fixed workspace (read when its first handle is made, so set before the first matmul), and torch's
    deterministic kernels where an op has one (embedding and scatter backward otherwise add atomically, in
    whatever order the threads run); ops without one warn instead of failing. On the CPU, torch's kernels
    are deterministic for a given thread count already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as CLIP and BART are trained: no decay on gains, biases, the temperature and
    embeddings (BART's `shared` token embedding included), decay on the other matrices; frozen ones left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed" in name or "shared" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup to `base_lr`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr
