"""The study plan: everything about a study except its pixels, from (seed, index) alone.

:func:`plan_study` draws the patient (fake but plausible PHI), the acquisition, the DICOM form, the
tumour type, the lesions and their labels. It is cheap (no pixels), so tests and the fold checks can
take the ground truth of hundreds of studies from it; render.py turns a plan into images.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import uuid
from dataclasses import dataclass

import numpy as np

from wbs_dist.schema import BREAST, LUNG, MALIGNANT, PROSTATE, STUDY_TUMOR_TYPES
from wbs_dist.synth.body import C0, R0
from wbs_dist.synth.lesions import Lesion, clear_of, lesion_count, make_lesions
from wbs_dist.synth.sites import pick_side

FORMS = ("multiframe", "single_view", "rle", "jpegls", "j2k", "implicit", "big_endian", "text_views")
SKIPPED_FORMS = {"jpeg_lossless": "JPEG Lossless process 14 has no encoder in the pydicom ecosystem"}
# First eight: every form once. Then the plain 2-frame object dominates, as in hospital exports.
FORM_CYCLE = FORMS + ("multiframe", "multiframe", "single_view", "multiframe")
# The study-level mix: shares of the primary tumour types (the study's three, schema.STUDY_TUMOR_TYPES),
# of metastatic patients per primary, and of annotated studies.
TUMOR_WEIGHTS = {LUNG: 0.374, PROSTATE: 0.303, BREAST: 0.323}
_TUMOR_CDF = np.cumsum([TUMOR_WEIGHTS[t] for t in STUDY_TUMOR_TYPES])
_MET_PROB = {LUNG: 0.3, PROSTATE: 0.32, BREAST: 0.28}
ANNOTATED_FRACTION = 0.95


# ----------------------------------------------------------------------------------------------------
# Ground-truth records (Lesion is in lesions.py, Study in render.py)


@dataclass(frozen=True)
class Patient:
    name: str  # DICOM PN, FAMILY^Given
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # M | F
    age: int


@dataclass(frozen=True)
class Acquisition:
    manufacturer: str
    model: str
    station: str
    serial: str
    software: str
    institution: str
    institution_address: str
    referring: str
    operator: str
    study_date: str
    study_time: str
    injection_time: str
    accession: str
    study_id: str
    dose_mbq: float
    scan_speed_cm_min: float


@dataclass(frozen=True)
class StudyPlan:
    seed: int
    index: int
    study_uid: str
    form: str
    patient: Patient
    tumor_type: str
    metastatic_intent: bool  # the generator's intent; the labels carry noise on top
    annotated: bool
    lesions: tuple[Lesion, ...]
    acquisition: Acquisition
    pixel_dtype: str  # uint16 | int16
    posterior_first: bool  # frame / file order
    geometry: tuple[float, float, float]  # scale, row shift, column shift of the patient
    gains: tuple[float, float, float, float]  # bone, soft tissue, kidneys, bladder
    counts: tuple[float, float]  # target expected total counts, anterior / posterior
    injection_site: tuple[float, float, float] | None  # row, col (anterior), amplitude; not a lesion

    @property
    def malignant(self) -> bool:
        return any(les.label == MALIGNANT for les in self.lesions)


# ----------------------------------------------------------------------------------------------------
# Deterministic helpers


def study_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream `stream` of study `index` (1: the plan, 2: the Poisson counts)."""
    return np.random.default_rng([seed, index, stream])


def synth_uid(seed: int, *parts) -> str:
    """A ``2.25.`` UID that depends only on the seed and the parts (study index, role...)."""
    digest = hashlib.sha256(repr(("wbs-dist-synth", seed) + parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


_WEYL_STEPS = ((math.sqrt(5) - 1) / 2, math.sqrt(2) - 1, math.sqrt(3) - 1, math.sqrt(11) - 3)


def _weyl(seed: int, index: int, which: int) -> float:
    """Low-discrepancy value in [0, 1) for study `index`: equidistributed over any run of indices."""
    start = int.from_bytes(hashlib.sha256(f"weyl/{seed}/{which}".encode()).digest()[:8], "big") / 2**64
    return (start + index * _WEYL_STEPS[which]) % 1.0


def form_for_index(index: int) -> str:
    """The DICOM form of study `index` (:data:`FORM_CYCLE`)."""
    return FORM_CYCLE[index % len(FORM_CYCLE)]


# ----------------------------------------------------------------------------------------------------
# Fake but plausible identities (PHI-like test data)

_SYL_A = ["Al", "Ber", "Bran", "Cal", "Dor", "El", "Fen", "Gar", "Hal", "Har", "Kel", "Lan", "Mar",
          "Mor", "Nor", "Os", "Pen", "Ral", "Ros", "Sel", "Stan", "Tor", "Vel", "Wen", "Win", "Ha",
          "Lind", "Kra", "Bo", "Fal"]
_SYL_B = ["", "a", "e", "i", "o", "en", "er", "in"]
_SYL_C = ["son", "ley", "man", "berg", "ford", "ton", "ski", "ez", "ini", "ström", "holt", "wick",
          "mann", "sen", "ow", "ard", "ier", "ova"]
_GIVEN = {
    "M": ["James", "Peter", "Anton", "Henrik", "Luis", "Marco", "Tomas", "Jan", "David", "Karl", "Olaf",
          "Stefan", "Paul", "Viktor", "Georg", "Emil", "José", "Björn", "Samuel", "Ivan"],
    "F": ["Anna", "Maria", "Helena", "Sofia", "Clara", "Ingrid", "Elena", "Lucia", "Marta", "Greta",
          "Irene", "Nora", "Petra", "Julia", "Rosa", "Agnes", "Renée", "Zoë", "Ada", "Lena"],
}
_INSTITUTIONS = [("St. Aldric General Hospital", "12 Harbour Road, Kingsport"),
                 ("Northfield University Hospital", "1 Campus Drive, Northfield")]
_CAMERAS = [  # (manufacturer, model, station, serial, software, institution index)
    ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670", "NM670-A", "67010482", "Xeleris 4.0", 0),
    ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670", "NM670-B", "67011937", "Xeleris 4.0", 1),
    ("Philips", "Precedence 16", "PRECEDENCE16", "3701288", "JETStream 3.0", 0),
]


def _surname(rng) -> str:
    return (_SYL_A[rng.integers(len(_SYL_A))] + _SYL_B[rng.integers(len(_SYL_B))]
            + _SYL_C[rng.integers(len(_SYL_C))])


def _person(rng, sex: str, upper: bool) -> str:
    name = f"{_surname(rng)}^{_GIVEN[sex][rng.integers(len(_GIVEN[sex]))]}"
    if rng.random() < 0.3:
        name += f"^{'ABCDEFGHJKLMNPRSTW'[rng.integers(18)]}"
    return name.upper() if upper else name


def _unique_digits(seed: int, index: int, salt: int, digits: int) -> int:
    # an affine map mod 10^digits with a multiplier coprime to 10 is a bijection: IDs never collide
    mod = 10**digits
    offset = int.from_bytes(hashlib.sha256(f"{seed}/{salt}".encode()).digest()[:8], "big")
    return (3_141_593 * (index + 1) + offset) % mod


# ----------------------------------------------------------------------------------------------------
# Planning (cheap ground truth)


def followup_patients(seed: int, patients: int, followups: float) -> list[int]:
    """For an archive of `patients` first studies (indices 0 .. patients-1) and round(followups x
    patients) follow-up scans after them (indices patients, patients+1, ...): the index of the first
    study of each follow-up's patient. Drawn with replacement from (seed, patients), so some
    patients get two or more follow-ups; the same list for the same arguments."""
    if not 0.0 <= followups <= 10.0:
        raise ValueError(f"followups must be in [0, 10] (follow-up scans per patient), got {followups!r}")
    n = int(round(followups * patients))
    if n == 0:
        return []
    return [int(i) for i in np.random.default_rng([seed, patients, 0xF0110]).integers(0, patients, n)]


def plan_study(seed: int, index: int, patient_of: int | None = None) -> StudyPlan:
    """Everything about study `index` except pixels: identity, acquisition, lesions and labels.

    `patient_of`: the index of an earlier study whose patient this one is (a follow-up scan, as
    hospital archives hold for many patients): it takes that patient's identity and primary tumour,
    and a date after that study; acquisition, lesions and labels are its own. Without it (the
    default) the plan is what it always was for (seed, index)."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    first = None
    if patient_of is not None:
        if not 0 <= patient_of < index:
            raise ValueError(f"patient_of must be an earlier study's index (0 .. {index - 1}), got {patient_of}")
        first = plan_study(seed, patient_of)
    rng = study_rng(seed, index, 1)
    # Weyl sequences instead of independent draws for the study-level mix: any archive, even a small
    # one, then holds tumour types, metastatic patients and unannotated studies near their shares.
    tumor = STUDY_TUMOR_TYPES[int(np.searchsorted(_TUMOR_CDF, _weyl(seed, index, 0)))]
    if first is not None:
        tumor = first.tumor_type    # one primary per patient (ingest refuses two)
    sex = {PROSTATE: "M", BREAST: "F"}.get(tumor) or ("M" if rng.random() < 0.6 else "F")

    study_day = dt.date(2015, 1, 5) + dt.timedelta(days=int(rng.integers(0, 9 * 365)))
    birth = dt.date(int(rng.integers(1935, 1991)), 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    if first is not None:
        # The same person, seen again 2 to 24 months later (the draws above are kept, so the rest of
        # the stream is what it would be without patient_of).
        sex = first.patient.sex
        birth = dt.datetime.strptime(first.patient.birth_date, "%Y%m%d").date()
        study_day = dt.datetime.strptime(first.acquisition.study_date, "%Y%m%d").date() + \
            dt.timedelta(days=int(np.random.default_rng([seed, index, 3]).integers(60, 730)))
    age = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
    cam = _CAMERAS[rng.choice(3, p=[0.35, 0.3, 0.35])]
    upper = cam[0].startswith("GE")
    inst, addr = _INSTITUTIONS[cam[5]]
    secs = int(rng.integers(10 * 3600 + 1800, 17 * 3600 + 1800))
    inj = secs - int(rng.integers(150, 240)) * 60
    patient = Patient(
        name=_person(rng, sex, upper),
        patient_id=f"MRN{_unique_digits(seed, index, 1, 7):07d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        age=int(age),
    )
    if first is not None:
        # Names as this camera's software writes them (GE upper-cases), the same person otherwise.
        name = first.patient.name.upper() if upper else first.patient.name
        patient = Patient(name=name, patient_id=first.patient.patient_id, birth_date=first.patient.birth_date,
                          sex=sex, age=int(age))
    acq = Acquisition(
        manufacturer=cam[0], model=cam[1], station=cam[2], serial=cam[3], software=cam[4],
        institution=inst, institution_address=addr,
        referring=_person(rng, "M" if rng.random() < 0.5 else "F", upper),
        operator=_person(rng, "M" if rng.random() < 0.5 else "F", upper),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        injection_time=f"{inj // 3600:02d}{inj // 60 % 60:02d}{inj % 60:02d}",
        accession=f"A{_unique_digits(seed, index, 2, 9):09d}",
        study_id=str(int(rng.integers(1000, 99999))),
        dose_mbq=float(round(rng.uniform(550, 800), 1)),
        scan_speed_cm_min=float(rng.choice([12.0, 15.0, 16.0, 20.0])),
    )

    scale = float(rng.uniform(0.95, 1.13))
    geometry = (scale, float(rng.uniform(-12, 35)), float(rng.uniform(-5, 5)))
    gains = (float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.05, 0.1)),
             float(rng.uniform(0.3, 1.5)), float(math.exp(rng.normal(math.log(5.0), 0.7))))
    c_ant = float(rng.uniform(1.0e6, 2.6e6))
    counts = (c_ant, float(c_ant * rng.uniform(1.0, 1.15)))

    metastatic = bool(_weyl(seed, index, 1) < _MET_PROB[tumor])
    n_target = lesion_count(metastatic, _weyl(seed, index, 3))
    lesions = make_lesions(rng, tumor, metastatic, n_target, geometry)

    inj_site = None
    if rng.random() < 0.1:  # tracer extravasation at the injection site: hot, but not a lesion
        r, x = ((283, 95) if rng.random() < 0.6 else (405, 104))
        s = pick_side(rng)
        row = R0 + scale * r + geometry[1]
        col = C0 + scale * s * x + geometry[2]
        if clear_of(lesions, row, col, 8.0):
            inj_site = (float(row), float(col), float(rng.uniform(2.0, 8.0)))

    form = form_for_index(index)
    return StudyPlan(
        seed=seed, index=index, study_uid=synth_uid(seed, index, "study"), form=form, patient=patient,
        tumor_type=tumor, metastatic_intent=metastatic,
        annotated=bool(_weyl(seed, index, 2) < ANNOTATED_FRACTION),
        lesions=lesions, acquisition=acq,
        pixel_dtype="int16" if form in ("implicit", "big_endian") else "uint16",
        posterior_first=bool(rng.random() < 0.25), geometry=geometry, gains=gains, counts=counts,
        injection_site=inj_site,
    )

