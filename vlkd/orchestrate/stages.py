"""The pipeline's stages as DVC sees them, and running them one at a time through DVC.

The stage list comes from dvc.yaml (through DVC's own index, so templating and foreach stages resolve
as DVC resolves them) in dependency order, ties kept in file order, each with the stages it needs. Each
stage runs as `dvc repro --single-item <stage>`: DVC decides whether it is up to date (and skips it),
restores it from its run cache, or runs its command and records the result in dvc.lock. Running the
stages in dependency order this way does what one `dvc repro` does; stages that do not need each other
may run at the same time, as DVC allows: it holds its repository lock only around starting and recording a
stage, and `--wait-for-lock` makes a `dvc repro` that meets another's lock wait for it instead of failing.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlkd.errors import VlkdError
from vlkd.orchestrate.process import Completed, Redactor, stream

DVC = (sys.executable, "-m", "dvc")
BAD_INPUT_EXIT = 2  # what `vlkd` exits with on bad input (VlkdError): running again will not help
# DVC's hints after a stage ran; they are noise in a flow's log (the flow records dvc.lock itself).
DVC_HINTS = ("To track the changes with git", "git add dvc.lock", "To enable auto staging",
             "dvc config core.autostage true", "Use `dvc push` to send your updates")


@dataclass(frozen=True)
class Output:
    path: str  # relative to the project
    cached: bool
    persist: bool
    metric: bool
    plot: bool


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    outs: tuple[Output, ...] = ()
    needs: tuple[str, ...] = ()  # the stages whose outputs this one reads
    @property
    def metrics(self) -> list[str]:
        return [out.path for out in self.outs if out.metric]

    @property
    def plots(self) -> list[str]:
        return [out.path for out in self.outs if out.plot]


@dataclass
class StageRun:
    name: str
    status: str  # ran | skipped (up to date) | restored (from DVC's run cache)
    seconds: float
    lines: list[str] = field(default_factory=list, repr=False)


class StageFailed(Exception):
    """A stage's command (or DVC around it) failed. `permanent`: bad input, a retry cannot help."""

    def __init__(self, stage: str, returncode: int, reason: str, permanent: bool, tail: list[str]) -> None:
        super().__init__(f"stage {stage} failed ({reason})")
        self.stage, self.returncode, self.reason, self.permanent, self.tail = stage, returncode, reason, permanent, tail

    def __reduce__(self):  # picklable (Prefect may serialize a failed task's exception)
        return (type(self), (self.stage, self.returncode, self.reason, self.permanent, self.tail))


def list_stages(root: Path) -> list[Stage]:
    """Every stage of the project's pipeline, in dependency order (file order among independent ones)."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            index = repo.index
            stages = [stage for stage in index.stages if getattr(stage, "cmd", None)]
            position = {id(stage): i for i, stage in enumerate(stages)}
            graph = nx.DiGraph()
            graph.add_nodes_from(position)
            for stage, dependency in index.graph.edges:  # stage depends on dependency
                if id(stage) in position and id(dependency) in position:
                    graph.add_edge(id(dependency), id(stage))
            order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
            names = {id(stage): _address(stage, root) for stage in stages}
            by_id = {id(stage): _describe(stage, root, tuple(sorted(map(names.get, graph.predecessors(id(stage))))))
                     for stage in stages}
    except DvcException as err:
        raise VlkdError(f"DVC cannot read the pipeline in {root}: {err}; fix dvc.yaml") from err
    return [by_id[key] for key in order]


def _address(stage, root: Path) -> str:
    """The stage's name as `dvc repro` takes it from the project root: `name` for the root dvc.yaml,
    `path/dvc.yaml:name` for another one."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == (root / "dvc.yaml").resolve():
        return stage.name
    return f"{dvcfile.relative_to(root.resolve()).as_posix()}:{stage.name}"


def _describe(stage, root: Path, needs: tuple[str, ...]) -> Stage:
    outs = []
    for out in stage.outs:
        path = Path(out.fs_path)
        rel = path.relative_to(root.resolve()) if path.is_absolute() else path
        outs.append(Output(str(rel), bool(out.use_cache), bool(out.persist), bool(out.metric), bool(out.plot)))
    cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
    return Stage(_address(stage, root), cmd, tuple(outs), needs)


def plan(root: Path, until: str | None = None) -> list[Stage]:
    """The stages to run: `until` and the stages it depends on (as `dvc repro until`), or else every stage
    that writes metrics or plots and the stages they depend on. So a stage that only provides data (the
    synthetic world) runs only when a stage that is run reads its output."""
    stages = list_stages(root)
    names = [stage.name for stage in stages]
    if until is not None and until not in names:
        raise VlkdError(f"no stage {until!r} in {root / 'dvc.yaml'} (stages: {', '.join(names)}); check `until`")
    targets = {until} if until else {stage.name for stage in stages if stage.metrics or stage.plots}
    if not targets:
        return stages
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        needed = set(targets)
        for stage in graph.nodes:
            if _address(stage, root) in targets:
                needed |= {_address(dependency, root) for dependency in nx.descendants(graph, stage)}
    return [replace(stage, needs=tuple(name for name in stage.needs if name in needed))
            for stage in stages if stage.name in needed]


# DVC's log, not Repo.reproduce(): it returns ran and run-cache stages alike, and its commands print past stream().
_RAN = re.compile(r"^Running stage '(?P<name>[^']+)'")
_SKIPPED = re.compile(r"^Stage '(?P<name>[^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '(?P<name>[^']+)' is cached - skipping run")


def repro(root: Path, stage: str, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
          redact: Redactor | None = None) -> StageRun:
    """`dvc repro --single-item <stage>`, its output streamed to `on_line`; raises StageFailed."""
    def forward(line: str) -> None:
        if not line.lstrip().startswith(DVC_HINTS):
            on_line(line)

    done = stream([*DVC, "--wait-for-lock", "repro", "--single-item", stage], root, forward, env=env, redact=redact)
    if done.returncode != 0:
        raise failure(stage, done)
    status = "skipped"
    for line in done.lines:
        if _RAN.match(line):
            status = "ran"
        elif _RESTORED.match(line) and status != "ran":
            status = "restored"
    return StageRun(stage, status, done.seconds, done.lines)


_MISSING_OUTPUT = re.compile(r"output '[^']+' does not exist")


def failure(stage: str, done: Completed) -> StageFailed:
    """What went wrong, in one line, and whether running again could help."""
    errors = [line for line in done.lines if line.startswith("vlkd: error:")]
    if errors:
        return StageFailed(stage, done.returncode, errors[-1], True, done.tail())
    exited = [re.search(r"exited with (-?\d+)", line) for line in done.lines]
    codes = [int(match.group(1)) for match in exited if match]
    dvc_errors = [line for line in done.lines if line.startswith("ERROR:")]
    reason = dvc_errors[-1] if dvc_errors else (done.tail(1)[0] if done.lines else f"exit code {done.returncode}")
    # A command that exited 0 without writing an output dvc.yaml declares will not write it when run again.
    missing_output = bool(dvc_errors) and _MISSING_OUTPUT.search(dvc_errors[-1]) is not None
    permanent = (bool(codes) and codes[-1] == BAD_INPUT_EXIT) or missing_output
    return StageFailed(stage, done.returncode, reason, permanent, done.tail())


def push(root: Path, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
         redact: Redactor | None = None) -> Completed:
    """`dvc push` of everything dvc.lock records, to the default remote."""
    done = stream([*DVC, "push"], root, on_line, env=env, redact=redact)
    if done.returncode != 0:
        reason = next((line for line in reversed(done.lines) if line.startswith("ERROR")), f"exit {done.returncode}")
        raise StageFailed("push", done.returncode, reason, False, done.tail())
    return done


# ---------------------------------------------------------------------------------------------------
# Keeping the last good outputs when a stage fails
# ---------------------------------------------------------------------------------------------------
class Snapshot:
    """Before a stage runs, copies of its small uncached outputs (metric and plot files), which DVC
    deletes before running it and cannot restore from its cache."""

    def __init__(self, root: Path, stage: Stage, max_bytes: int = 16 << 20) -> None:
        self.root, self.stage = root, stage
        self.folder = Path(tempfile.mkdtemp(prefix=f"vlkd-{stage.name}-"))
        self.saved: list[str] = []
        for out in stage.outs:
            source = root / out.path
            if out.cached or out.persist or not source.exists() or _size(source) > max_bytes:
                continue
            target = self.folder / out.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            self.saved.append(out.path)

    def restore(self, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
                redact: Redactor | None = None) -> list[str]:
        """Put back what the failed stage's run removed: its cached outputs as dvc.lock records them
        (`dvc checkout`), its uncached ones from the copies. Folders the stage updates in place
        (persist) are left as they are: they hold work a rerun resumes from."""
        restored = []
        cached = [out.path for out in self.stage.outs if out.cached and not out.persist]
        if cached:
            done = stream([*DVC, "checkout", "--force", *cached], self.root, on_line, env=env, redact=redact)
            if done.returncode == 0:
                restored += cached
        for path in self.saved:
            target = self.root / path
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.folder / path
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            restored.append(path)
        return restored

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
