"""Prometheus text exposition format, for node_exporter's textfile collector.

Operators already watch their hosts with Prometheus; a ``.prom`` file the
collector picks up needs no daemon of ours.  This module only renders text:
the job state records (see :mod:`vmsnapbackup.workflows.jobstate`) are the
source, so the file always describes every job, not only the last one run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["MetricFamily", "escape_label", "render"]

PREFIX = "vmsnapbackup_"


@dataclass
class MetricFamily:
    name: str
    help: str
    type: str = "gauge"
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: Mapping[str, str], value: float) -> None:
        self.samples.append((dict(labels), float(value)))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: list[MetricFamily]) -> str:
    """The whole file: HELP and TYPE once per family, then its samples."""
    out: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        name = PREFIX + fam.name
        help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {fam.type}")
        for labels, value in fam.samples:
            body = ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{name}{{{body}}} {_number(value)}" if body
                       else f"{name} {_number(value)}")
    return "\n".join(out) + "\n" if out else ""
