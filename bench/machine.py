"""The machine a bench ran on, named the same way in every bench's output and JSON."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    return f"{cpu_name()}, {os.cpu_count()} cores"
