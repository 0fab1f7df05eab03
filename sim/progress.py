"""Progress bars for long commands: tqdm on stderr, silent when stderr is not a terminal or when asked.

    with progress_bar(total, "plan", "replay", quiet) as bar:
        ...; bar.update(1)

Every long command (train-estimator, plan, analyze predictors/lrc, compare, sweep) takes `--quiet`; a bar
never goes to stdout, so piped output stays clean.
"""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None, desc: str, unit: str, quiet: bool = False) -> Any:
    """A tqdm bar on stderr; disabled with `quiet` or when stderr is not a TTY (tqdm's disable=None)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet else None,
                leave=False, dynamic_ncols=True)
