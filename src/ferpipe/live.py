"""dvclive curves for the training stages, written the way dvc.yaml declares them."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ferpipe.store import staged


@contextmanager
def live_curves(live_dir: str | os.PathLike | None, enabled: bool = True):
    """A dvclive Live logging under live_dir (None when live_dir is empty or not enabled, e.g. off
    rank 0). On exit it ends the run and removes dvclive's summary metrics.json: it repeats the
    stage's own metrics file, and inside a dvc.yaml plots folder DVC would try (and fail) to read it
    as a plot. The curves stay, as plots/metrics/**.tsv. Inside a stage's output set (ferpipe.store)
    they are written to its staging folder and appear with the stage's other outputs.
    """
    if not live_dir or not enabled:
        yield None
        return
    from dvclive import Live
    live_dir = staged(live_dir)
    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    try:
        yield live
    finally:
        live.end()
        Path(live_dir, "metrics.json").unlink(missing_ok=True)
