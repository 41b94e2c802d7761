"""The out-of-fold rule: a patient the run trained on is scored only by the fold that held it out.

Scoring the archive a run was trained on with all five fold models would grade each lesion with four
models that saw it in training. So the scorer recognises the studies whose patient is in the run's
store: the patient's pseudonym (deid.keyed_hash under the site secret, as ingest makes it) looked up
in the store's folds. Such a study is scored by the model of the patient's validation fold alone,
and its rows carry that fold; scoring the training archive then reproduces the cross-validation's
predictions. New patients get the ensemble (fold empty).

Recognition needs the site secret the store was made under and the store's split to be the run's.
Without the secret (or with another), known patients cannot be recognised: `unrecognised` says why,
and the command says it loudly, since every such score would be in-sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wbs_dist.data.deid import default_secret_path, keyed_hash, load_secret, secret_check
from wbs_dist.data.folds import has_folds, read_folds, split_fingerprint, split_changed
from wbs_dist.data.store import Store, StoreError, key_to_int

ENSEMBLE = -1          # the fold of a study scored by every model


@dataclass
class KnownPatients:
    """Pseudonym -> validation fold of the patients the run's split holds."""

    folds: dict[int, int] = field(default_factory=dict)
    secret: bytes | None = None
    unrecognised: str = ""          # why known patients cannot be recognised ('' when they can)
    store: Path | None = None

    def fold_of(self, patient_id: str, study_uid: str) -> int:
        """The validation fold of the study's patient, or ENSEMBLE for a patient the run never saw."""
        if self.secret is None or not self.folds:
            return ENSEMBLE
        # As ingest keys it: a study without Patient ID is its own patient.
        key = keyed_hash(self.secret, "patient", patient_id) if patient_id else \
            keyed_hash(self.secret, "patient-of-study", study_uid)
        return self.folds.get(key_to_int(key), ENSEMBLE)

    def fingerprint(self) -> dict:
        """What the parts of a scoring run depend on: the same archive scored with another secret or
        store assigns other folds."""
        return {"store": str(self.store.resolve()) if self.store else None,
                "secret": secret_check(self.secret) if self.secret else None, "patients": len(self.folds)}


def known_patients(store: Path | None, split: str, secret_file: Path | None = None) -> KnownPatients:
    """The run's known patients, from its store (config key `store`, or --store) and split fingerprint
    ('' for runs that predate it: not checked). Raises SplitChanged (exit 2) when the store now holds
    another split: its folds would send patients to models that trained on them."""
    secret_path = Path(secret_file) if secret_file is not None else default_secret_path()
    secret = load_secret(secret_path)
    if secret is None:
        return KnownPatients(unrecognised=f"no secret file at {secret_path}")
    if store is None or not Path(store).exists():
        return KnownPatients(secret=secret, unrecognised=f"the run's store {store} is not here (pass --store)")
    try:
        st = Store.open(Path(store))
    except StoreError as exc:
        return KnownPatients(secret=secret, unrecognised=str(exc))
    if not has_folds(st):
        return KnownPatients(secret=secret, unrecognised=f"store {st.path} has no folds")
    made_under = st.root.attrs.get("secret_check")
    if made_under is not None and made_under != secret_check(secret):
        return KnownPatients(secret=secret, unrecognised=f"{secret_path} is not the secret store {st.path} was "
                             "ingested under (pass --secret-file)")
    now = split_fingerprint(st)
    if split and split != now:
        raise split_changed("the run", split, st, now)
    patients, fold, _ = read_folds(st)
    return KnownPatients({int(p): int(f) for p, f in zip(np.asarray(patients), np.asarray(fold))}, secret,
                         store=st.path)
