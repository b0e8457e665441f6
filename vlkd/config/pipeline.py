"""The flows' section: locking, retries, pushing, the refresh gate, promotion, the schedule."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from vlkd.config.base import Section


class GateMetric(Section):
    """A metric the refresh gate compares with the last promoted model's (flows/refresh.py)."""

    metric: str = Field(min_length=1, description="dotted key in the metrics file, e.g. vqa.overall")
    file: Path = Path("metrics/evaluate.json")  # a metrics file a stage writes, inside the project
    higher_is_better: bool = True
    tolerance: float = Field(0.0, ge=0, description="allowed worsening, in the metric's units")
    relative_tolerance: float = Field(0.0, ge=0, description="allowed worsening, as a share of the promoted value")


class ScheduleParams(Section):
    """When the served deployment retrains (flows/serve.py)."""

    cron: str = "0 3 * * 1"  # minute hour day-of-month month day-of-week: Mondays at 03:00
    timezone: str = "UTC"
    active: bool = True  # false: the deployment is served with its schedule paused

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) not in (5, 6):
            raise ValueError(f"cron {cron!r} needs 5 fields (minute hour day month weekday), e.g. '0 3 * * 1'")
        return cron


class PipelineParams(Section):
    """The Prefect flows (flows/): locking, retries, pushing, the refresh gate, promotion, the schedule."""

    lock_timeout: float = Field(60.0, ge=0, description="seconds a run waits for another run on the workspace")
    retries: int = Field(2, ge=0, description="extra attempts of a stage after a transient failure")
    retry_delay_seconds: float = Field(20.0, ge=0)
    # Stages that do not need each other's outputs (the teacher's branch and the language model) run at the
    # same time, up to this many; 1 runs them one after the other.
    concurrent_stages: int = Field(1, ge=1)
    push: bool = True  # `dvc push` to the default DVC remote after a successful run
    report: Path = Path("data/eval/report.html")  # linked from the run's artifact
    tag_prefix: str = Field("promoted/", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                            description="promoted models are git tags <prefix>v1, v2, ...")
    gate: list[GateMetric] = [
        GateMetric(metric="vqa.overall", relative_tolerance=0.05),
        GateMetric(metric="vqa-shifted.overall", relative_tolerance=0.05),
        GateMetric(metric="captions.CIDEr", relative_tolerance=0.05),
    ]
    schedule: ScheduleParams = ScheduleParams()
    # Credentials for DVC remotes from Prefect Secret blocks: environment variable -> block name, e.g.
    # {AWS_SECRET_ACCESS_KEY: aws-secret-access-key}. Set in the stage commands' environment, never logged.
    secrets: dict[str, str] = {}
