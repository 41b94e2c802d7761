"""`wbs-dist demo`: the pipeline end to end on the built-in synthetic archive, local mode.

Each step is skipped when its output is already there, so rerunning the demo is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EXIT_OK, UsageError


def run_demo(out: Path, patients: int = 60, seed: int = 0, workers: int = 2) -> int:
    from .ingest import run_ingest
    from .store import Store
    from .synth import run_synth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "archive"
    store = out / "store.zarr"
    # The demo keeps its pseudonym secret beside its data: it holds no real patients.
    secret = Path(os.environ.get("WBS_DIST_SECRET_FILE", out / "secret"))
    if not archive.exists():
        print(f"[demo] 1/2 synthesising {patients} patients into {archive}")
        run_synth(archive, patients=patients, seed=seed, form="dir")
    else:
        print(f"[demo] 1/2 archive {archive} already there")
    print(f"[demo] 2/2 ingesting into {store}")
    rc = run_ingest(archive, store=store, secret_file=secret, workers=workers)
    if rc not in (EXIT_OK,):
        raise UsageError(f"ingest of the synthetic archive reported skipped inputs (exit {rc}); see {store}.errors.csv")
    st = Store.open(store)
    table = st.lesion_table()
    counts = st.root.attrs["counts"]
    print(f"[demo] done: {counts['studies']} studies, {counts['lesions']} lesions "
          f"({100 * table['label'].mean():.1f} % malignant) in {store}")
    print(f"[demo] open it with: python -c \"import zarr; print(zarr.open_group('{store}').tree())\"")
    return EXIT_OK
