"""The run's report (`echoatt report`)."""

from __future__ import annotations

from echoatt.evaluation.report import write_report
from echoatt.run.config import (
    ReportConfig,
)


def report(config: ReportConfig) -> None:
    md, page = write_report(config.run)
    print(f"wrote {md} and {page}")
