"""Pseudonyms and what is kept: the store's only link to a patient is a keyed hash.

Keys are HMAC-SHA256 of the original identifier under a site secret that lives outside the store
(created on first use, mode 0600), truncated to 64 bits and written as 16 hex digits. Without the
secret the keys cannot be linked back to patients, and two sites get unrelated keys.

What the store keeps of a DICOM object is an allow-list (KEPT_ATTRIBUTES), in the spirit of the DICOM
Basic Application Level Confidentiality Profile (PS3.15 E.1): technical attributes needed to read the
pixels and compare cameras; no names, IDs, dates, institution, device serials or private tags.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from wbs_dist.atomic import PRIVATE, create_once
from wbs_dist.errors import UsageError

SECRET_ENV = "WBS_DIST_SECRET_FILE"

# Attributes copied into a study's metadata as they are. Everything else is dropped, except the camera
# (DEVICE_ATTRIBUTES), kept only as a word of a fixed vocabulary.
KEPT_ATTRIBUTES = (
    "Modality",
    "SOPClassUID",
    "Rows",
    "Columns",
    "BitsStored",
    "PixelRepresentation",
    "PixelSpacing",
)
# Free text a site's staff or a converter may have filled with anything (a station nickname, a name):
# the vendor and the model family are kept when they are among the known gamma cameras (the study used
# two vendors; a site may compare them), and dropped otherwise.
DEVICE_ATTRIBUTES = ("Manufacturer", "ManufacturerModelName")
VENDORS = {   # vocabulary -> how DICOM writers spell it (upper case, at the start of the field)
    "GE": ("GE ", "GE MEDICAL", "GE HEALTHCARE", "GENERAL ELECTRIC", "ELSCINT"),
    "Philips": ("PHILIPS", "ADAC"),
    "Siemens": ("SIEMENS",),
    "Canon": ("CANON", "TOSHIBA"),
    "Mediso": ("MEDISO",),
    "Spectrum Dynamics": ("SPECTRUM DYNAMICS",),
    "Digirad": ("DIGIRAD",),
    "Hitachi": ("HITACHI",),
}
MODEL_FAMILIES = ("Discovery NM/CT 670", "Discovery NM/CT 870", "Discovery NM 630", "Discovery NM 530",
                  "Optima NM/CT 640", "NM/CT 870", "StarGuide", "Infinia", "Millennium", "Ventri",
                  "Symbia", "Intevo", "e.cam", "E.CAM", "BrightView", "Precedence", "Forte", "Skylight",
                  "Axis", "AnyScan", "D-SPECT", "Veriton", "Ergo", "Cardius")


def device_fields(manufacturer: str | None, model: str | None) -> dict:
    """The camera as the store keeps it: {'Manufacturer': vendor or None, 'ManufacturerModelName':
    model family or None}, never the free text itself."""
    text = " ".join(str(manufacturer or "").upper().split()) + " "
    vendor = next((name for name, spellings in VENDORS.items() if text.startswith(spellings)), None)
    text = " ".join(str(model or "").split()).upper()
    family = next((f for f in MODEL_FAMILIES if f.upper() in text), None)
    return {"Manufacturer": vendor, "ManufacturerModelName": family}


def default_secret_path() -> Path:
    env = os.environ.get(SECRET_ENV)
    if env:
        return Path(env)
    return Path.home() / ".config" / "wbs_dist" / "secret"


def load_secret(path: Path | None = None) -> bytes | None:
    """The site secret, or None when its file does not exist (readers that must not create one:
    a new secret would recognise nobody)."""
    path = Path(path) if path is not None else default_secret_path()
    if not path.exists():
        return None
    mode = path.stat().st_mode & 0o077
    if mode:
        raise UsageError(f"secret file {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); "
                         f"run: chmod 600 {path}")
    data = path.read_bytes().strip()
    if len(data) < 32:
        raise UsageError(f"secret file {path} is too short to be a secret (need >= 32 bytes)")
    return data


def load_or_create_secret(path: Path | None = None) -> bytes:
    path = Path(path) if path is not None else default_secret_path()
    secret = load_secret(path)
    if secret is not None:
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two processes creating the secret at once must not end with different secrets: the first wins,
    # and both read back the winner's.
    create_once(path, secrets.token_hex(32).encode() + b"\n", mode=PRIVATE)
    return load_or_create_secret(path)


def secret_check(secret: bytes) -> str:
    """What a store records of the secret its keys were made under: a keyed hash of a constant, which
    tells whether a secret is that one without revealing it."""
    return keyed_hash(secret, "secret-check", "wbs-dist")


def keyed_hash(secret: bytes, kind: str, value: str) -> str:
    """16 hex digits identifying `value` of `kind` ('patient', 'study') under `secret`."""
    mac = hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256)
    return mac.hexdigest()[:16]
