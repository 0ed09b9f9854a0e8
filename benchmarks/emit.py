"""Every benchmark's last step: its result as one JSON line, printed and written to --out.

Light on purpose (the standard library and ssr.data.layout): scripts whose worker processes
re-import them, such as benchmarks/superpixels.py, import it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssr.data.layout import atomic_path  # noqa: E402


def emit(report: dict, out: str | Path | None) -> None:
    """Print the benchmark's JSON line last, and write it to `out` too (atomically) when given."""
    line = json.dumps(report)
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(line + "\n")
    print(line)
