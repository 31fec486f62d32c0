"""Memory probes for the benchmarks: this process's resident set (Linux ``/proc``; elsewhere the
peak from ``getrusage``), in MB."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def status_kb(field: str, pid: int | str = "self") -> Optional[int]:
    """``field`` of ``/proc/<pid>/status`` in kB (None where unreadable: no /proc, gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    kb = status_kb("VmRSS")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def peak_rss_mb() -> float:
    kb = status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024
