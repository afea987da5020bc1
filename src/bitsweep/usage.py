"""A workflow job's wall and CPU seconds: the last line of its log (scripts/run_stage.py writes it), read by the
report's time table for the cores each rule kept busy."""

from __future__ import annotations

import json

USAGE_PREFIX = "bitsweep-usage: "


def usage_line(wall_s: float) -> str:
    """The job's wall and CPU seconds (this process and the children it waited for), the last line of its log:
    the report's time table reads the cores a job kept busy from it. Snakemake's own benchmark ``cpu_time``
    samples the process every 30 s after its first 15, so it misses up to 30 s of a longer job's CPU."""
    import resource

    cpu = sum(
        u.ru_utime + u.ru_stime
        for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return USAGE_PREFIX + json.dumps({"wall_s": round(wall_s, 3), "cpu_s": round(cpu, 3)})
