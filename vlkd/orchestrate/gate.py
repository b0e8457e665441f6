"""The promotion gate: a new model is promoted only if no gated metric got worse than the last
promoted model's by more than its tolerance.

A metric's allowed worsening is max(tolerance, relative_tolerance x |promoted value|), in the direction
`higher_is_better` says is worse. A gated metric the new run lacks fails the gate (it cannot be
checked); one the promoted model lacked passes (nothing to compare with) and is marked new.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkd.orchestrate.metrics import lookup


@dataclass(frozen=True)
class Check:
    file: str
    metric: str
    before: float | None
    after: float | None
    allowed: float  # how much worse `after` may be
    higher_is_better: bool
    verdict: str  # better | same | within tolerance | worse | missing | new

    @property
    def passed(self) -> bool:
        return self.verdict not in ("worse", "missing")

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def row(self) -> dict[str, Any]:
        return {"metric": f"{self.metric} ({self.file})", "promoted": self.before, "new": self.after,
                "change": self.change, "allowed worsening": self.allowed,
                "direction": "higher is better" if self.higher_is_better else "lower is better",
                "verdict": self.verdict}


@dataclass
class GateReport:
    checks: list[Check] = field(default_factory=list)
    baseline: str | None = None  # the promoted tag compared with; None: nothing promoted yet

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def rows(self) -> list[dict[str, Any]]:
        return [check.row() for check in self.checks]

    def summary(self) -> str:
        if self.passed:
            if self.baseline is None:
                return "no model promoted yet: the new model is the first"
            return f"no gated metric got worse than {self.baseline}'s beyond its tolerance"
        parts = []
        for check in self.failures:
            if check.verdict == "missing":
                parts.append(f"{check.metric} is missing from the new {check.file}")
            else:
                parts.append(f"{check.metric} {check.before:.4g} -> {check.after:.4g} "
                             f"(allowed worsening {check.allowed:.4g})")
        return f"worse than {self.baseline}: " + "; ".join(parts) if self.baseline else "; ".join(parts)


def compare(before: Mapping[str, Mapping] | None, after: Mapping[str, Mapping], gate: Iterable[Any],
            root: Path | None = None, baseline: str | None = None) -> GateReport:
    """Check each gated metric (objects with file, metric, higher_is_better, tolerance,
    relative_tolerance, e.g. vlkd.config.GateMetric) of `after` against `before` ({file: metrics}).
    `before` None means no model was promoted yet: every check passes as new."""
    report = GateReport(baseline=baseline)
    for spec in gate:
        name = relative_name(spec.file, root)
        new = lookup(after.get(name, {}), spec.metric)
        old = None if before is None else lookup(before.get(name, {}), spec.metric)
        allowed = 0.0 if old is None else max(spec.tolerance, spec.relative_tolerance * abs(old))
        if new is None:
            verdict = "missing"
        elif old is None:
            verdict = "new"
        else:
            gain = (new - old) if spec.higher_is_better else (old - new)
            if gain > 0:
                verdict = "better"
            elif gain == 0:
                verdict = "same"
            elif -gain <= allowed + 1e-12:
                verdict = "within tolerance"
            else:
                verdict = "worse"
        report.checks.append(Check(name, spec.metric, old, new, allowed, spec.higher_is_better, verdict))
    return report


def relative_name(path: Path | str, root: Path | None) -> str:
    """A metrics file as the project names it (relative, forward slashes)."""
    path = Path(path)
    if root is not None and path.is_absolute():
        try:
            path = path.relative_to(root.resolve())
        except ValueError:
            with contextlib.suppress(ValueError):
                path = path.relative_to(root)
    return path.as_posix()
