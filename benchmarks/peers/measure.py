"""What the benchmarks measure the same way (every worker of ``vs_peers.py``, whichever virtual environment it runs
in, and ``engine.py`` and ``oneshot.py``), with the standard library and torch only, never hf_prune: the process's
resident memory from ``/proc/self/status``, and the weights paged in before the baseline is read. A worker imports
it from its own folder, a script in ``benchmarks/`` as ``peers.measure``."""

from __future__ import annotations

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    """The process's resident memory now (VmRSS): what a prune's peak is measured above."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """The process's resident high-water mark (VmHWM)."""
    return _status_bytes("VmHWM")


def page_in(model) -> None:
    """from_pretrained leaves the weights memory-mapped until first read: read every one once, so that the RSS
    before the prune holds them and the prune's +RSS is its working memory, not the weights paged in."""
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
