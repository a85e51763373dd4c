"""OpenMP spin-waiting for command-line runs: idle intra-op threads hand their core back sooner.

After every parallel region, libgomp's threads (torch's intra-op pool; numba's) poll for the next one
before they sleep: 300,000 polls by default, milliseconds on CPUs with a slow ``pause``. A batch
pipeline runs other work beside the model — DataLoader workers decoding, threads drawing and encoding
overlays — and each thread spinning through a gap (the method, Python between batches) holds a core
that work is waiting for. ``GOMP_SPINCOUNT=20000`` still spans the short gaps between the parallel
regions of one forward pass, so the model itself does not slow down.

What it gained, measured, is in docs/performance.md.

libgomp reads its environment once, when it is loaded (``import torch``), so the CLI calls
:func:`shorten_spin_wait` before importing torch. A setting of the user's own (``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY``) is kept; other OpenMP runtimes (LLVM's libomp, Intel's) ignore the variable.
"""
from __future__ import annotations

import os
import sys

SPIN_COUNT = "20000"


def shorten_spin_wait() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy or torch is loaded already (too late to
    matter). Returns whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
