"""The training scaffold the teacher, language-model, distillation and fine-tuning loops share: device and
precision, AdamW with decay groups, transformers' warmup schedules, the optimizer step (clipping, schedule,
zeroing), the checkpoint a killed loop resumes from, per-epoch loss means and the progress bar. Each loop
keeps only what is its own: data, model, loss."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlkd.errors import VlkdError
from vlkd.io import remove_path, tmp_path_for

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str, setting: str) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is bad input for `setting`.
    Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise VlkdError(f"{setting} is cuda but torch sees no CUDA device; use auto or cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    deterministic_cuda()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


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


def worker_context(dataset: object, workers: int):
    """How DataLoader workers start: forked from a fork server, a fresh interpreter that has imported only
    torch and the dataset's module, not from this process. A fork of this process inherits its at-exit
    hooks, thread locks and stream objects (a Prefect run's log workers, a thread pool, a test runner's
    capture); a worker that trips on one while it exits ends with code 1 and no traceback (multiprocessing's
    forked child exits with 1 when its own shutdown raises), and the DataLoader then fails a run whose work
    was all done. The server starts once per process; a worker then costs a fork and unpickling the
    dataset, where "spawn" would cost an interpreter start and torch's import per worker and loader."""
    if not workers:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", type(dataset).__module__])  # no effect once the server runs
    return context


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA (no loss scaling needed, unlike fp16), fp32 on the CPU."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def autocast(device: torch.device, precision: str):
    """torch.autocast at `precision` (bf16 or fp16), or nothing for fp32."""
    dtype = PRECISIONS.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def decay_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_multipliers: dict[str, float] | None = None) -> list[dict]:
    """AdamW parameter groups as CLIP and BART are trained: no decay on gains, biases, the temperature and
    embeddings (BART's `shared` token embedding included), decay on the other matrices; frozen ones left out.
    `lr_multipliers` ({parameter-name prefix: factor}, with `lr`) gives the parameters under a prefix the
    learning rate lr x factor, as ViLT trains its task heads at 10x the rate of the pretrained body."""
    multipliers = lr_multipliers or {}
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed" in name or "shared" in name or "logit_scale" in name
        factor = next((f for prefix, f in multipliers.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((factor, exempt), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if exempt else weight_decay,
             **({"lr": lr * factor} if factor != 1.0 else {})}
            for (factor, exempt), params in groups.items() if params or factor == 1.0]


class Optimization:
    """AdamW over `decay_groups(model)` with transformers' warmup schedule (`schedule`: cosine or linear decay
    to 0 at `total_steps`) and gradient-norm clipping; `step()` is one optimizer step. `lr_multipliers` as in
    `decay_groups`; the schedule scales every group's rate alike."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 schedule: str = "cosine", max_grad_norm: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_multipliers: dict[str, float] | None = None):
        from transformers import get_scheduler  # imported here: transformers is slow to import

        self.parameters = [param for param in model.parameters() if param.requires_grad]
        self.max_grad_norm = max_grad_norm
        # fused: one kernel over all parameters, since a loop of small ops per tensor is most of the update's
        # time on the CPU (docs/benchmarks.md, "One training step").
        self.optimizer = torch.optim.AdamW(decay_groups(model, weight_decay, lr, lr_multipliers), lr=lr, betas=betas,
                                           eps=eps, fused=True)
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=total_steps)

    def step(self) -> float:
        """Clip, step, advance the schedule, zero the gradients; returns the learning rate the step used."""
        lr = self.scheduler.get_last_lr()[0]
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr


class Checkpoint:
    """The one way a training loop resumes after a kill: a file with the step, the model's, optimizer's and
    schedule's states, this process's random states (torch's CPU and CUDA generators, NumPy's and Python's
    global ones) and the loop's own state (`extra`: where it is in its data, its own generators), written
    whole (a temporary name, then a rename). A loop that saves at step s and resumes takes the same steps
    after s as one that was never stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def save(self, step: int, model: torch.nn.Module, optimization: Optimization, extra: dict | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(self.path)
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimization.optimizer.state_dict(),
                    "scheduler": optimization.scheduler.state_dict(), "random": _random_states(),
                    "extra": extra or {}}, tmp)
        tmp.replace(self.path)
        log.debug("checkpoint at step %d: %s", step, self.path)

    def resume(self, model: torch.nn.Module, optimization: Optimization,
               map_location: torch.device | str | None = None) -> tuple[int, dict]:
        """(the step to go on from, the loop's `extra`): (0, {}) when there is no checkpoint."""
        if not self.path.exists():
            return 0, {}
        # weights_only: tensors and plain Python values only (_random_states keeps NumPy's as lists).
        state = torch.load(self.path, map_location=map_location, weights_only=True)
        model.load_state_dict(state["model"])
        optimization.optimizer.load_state_dict(state["optimizer"])
        optimization.scheduler.load_state_dict(state["scheduler"])
        _set_random_states(state["random"])
        log.info("resuming from %s at step %d", self.path, state["step"])
        return state["step"], state["extra"]

    def remove(self) -> None:
        """After the loop's last step: the run is done; its checkpoint goes, and its folder if that is empty."""
        remove_path(self.path)
        with contextlib.suppress(OSError):  # not empty: other runs' files
            self.path.parent.rmdir()


def _random_states() -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "python": random.getstate()}


def _set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class EpochMeans:
    """The mean of each named loss over each epoch, as the stages' metrics and logs report them."""

    def __init__(self) -> None:
        self.means: list[dict[str, float]] = []
        self._sums: dict[str, tuple[float, int]] = {}

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            total, count = self._sums.get(name, (0.0, 0))
            self._sums[name] = (total + value, count + 1)

    def end_epoch(self) -> dict[str, float]:
        self.means.append({name: total / count for name, (total, count) in self._sums.items()})
        self._sums.clear()
        return self.means[-1]

    def of(self, name: str) -> list[float]:
        return [epoch[name] for epoch in self.means]

    def state(self) -> dict:
        """Plain values for a checkpoint's `extra`; `EpochMeans.restored` makes the same means from them."""
        return {"means": self.means, "sums": {name: list(pair) for name, pair in self._sums.items()}}

    @classmethod
    def restored(cls, state: dict) -> EpochMeans:
        means = cls()
        means.means = state.get("means", [])
        means._sums = {name: tuple(pair) for name, pair in state.get("sums", {}).items()}
        return means


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """The loops' progress bar: shown on a terminal (tqdm's `disable=None`), silent in logs and other ranks."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=None if enabled else True)


def trainable(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(param.numel() for param in parameters if param.requires_grad)
