"""The run's report (`echoatt report`)."""

from __future__ import annotations

from echoatt.config import (
    ReportConfig,
)
from echoatt.report import write_report


def report(config: ReportConfig) -> None:
    md, page = write_report(config.run)
    print(f"wrote {md} and {page}")
