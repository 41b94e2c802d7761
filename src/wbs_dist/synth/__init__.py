"""Synthetic whole-body bone-scan archive: NM DICOM in the forms converters meet, plus annotations.

Real patient data never enters this repository, so everything downstream (ingest, training, scoring,
reports) is exercised on an archive this package writes. It imitates a hospital export of 99mTc-MDP
whole-body scans: one study per patient (with ``followups``, some patients are scanned again: same
identity and primary tumour, a later date, lesions of their own), anterior and posterior views of
1024 x 256 counts with Poisson noise on a skeleton template, bladder and kidney activity, and hot-spot lesions whose label
(malignant/benign) follows their location, shape, contrast and the patient's burden, with label noise
(DESIGN 1). Annotations follow DESIGN 3.2: ``annotations.csv`` and ``masks/<study_uid>/<view>.png``.

Modules, in the direction data flows (each imports only from those above it):

- ``body``     the image grid, the skeleton template and its projection with attenuation (:func:`anatomy`).
- ``sites``    where lesions occur on that skeleton, and the site mix of each label.
- ``lesions``  the :class:`Lesion` record: counts, features, placement and the label model.
- ``plan``     :class:`Patient`, :class:`Acquisition`, :class:`StudyPlan`: fake identities, the DICOM
               form cycle, the study-level mix, :func:`plan_study`.
- ``render``   :class:`Study`: :func:`render_study`, :func:`make_study`.
- ``dicom``    the DICOM objects in the eight forms (:func:`study_datasets`, :func:`study_files`), with
               their own DICOM codes: the archive is the independent oracle of wbs_dist.data.dicom.
- ``archive``  annotation rows, mask PNGs, folder/zip/tar sinks and :func:`write_archive`.

The contract's vocabulary (views, labels, tumour types, file names, annotation columns) comes from
:mod:`wbs_dist.schema`; the generated tumour types are ``schema.STUDY_TUMOR_TYPES``.

Ground truth comes from two pure functions: :func:`plan_study` (patient, lesions, labels, DICOM
form; cheap, no pixels) and :func:`make_study` (the plan rendered to images and label maps). Both
derive their random streams from ``(seed, index)`` only, so any study can be regenerated alone and the
archive is byte-identical for a seed (no wall-clock time anywhere: dates derive from the seed).

DICOM forms (:data:`FORMS`), cycled by study index (:func:`form_for_index`) so that the first eight
studies hold each form once; after that the plain 2-frame object is the most common, as in real exports:

- ``multiframe``  one 2-frame NM object, Explicit VR Little Endian.
- ``single_view`` two single-frame NM objects (same study, separate series).
- ``rle``         2-frame, RLE Lossless (pylibjpeg-rle encoder).
- ``jpegls``      2-frame, JPEG-LS Lossless (pyjpegls encoder).
- ``j2k``         2-frame, JPEG 2000 Lossless (pylibjpeg-openjpeg encoder).
- ``implicit``    2-frame, Implicit VR Little Endian, int16 pixels.
- ``big_endian``  2-frame, Explicit VR Big Endian (retired, found in old archives; pydicom 3 writes
                  it), int16 pixels, view codes in the legacy SRT scheme (G-5215 / G-5216).
- ``text_views``  two single-frame objects without View Code Sequence: the view is named only by
                  'ANT'/'POST' in SeriesDescription and ImageComments.

Two-frame objects store the posterior frame first in about a quarter of studies: readers must take the
view from Detector Vector -> Detector Information Sequence -> View Code Sequence, never from frame order.

Skipped: JPEG Lossless (process 14, 1.2.840.10008.1.2.4.70) has no encoder in the pydicom ecosystem;
the real-file tests (pydicom-data ``JPEG-LL.dcm``) cover decoding it.

Other choices worth knowing:

- UIDs are ``2.25.<uuid>`` derived from a hash of (seed, study, role). ``pydicom.uid.generate_uid``
  ignores ``entropy_srcs`` when ``prefix=None`` (it returns a random UUID), so it cannot be used here.
- Counts Accumulated (0018,0070) at the top level is the pixel sum of the object (one view for the
  single-view forms, both frames for 2-frame objects); each Detector Information Sequence item also
  carries its own frame's sum, so every view's true sum is recorded.
- Every object holds PHI-like data that de-identification must remove: names, MRN-like IDs, birth
  dates, accession numbers, physicians, institution, and a private block (group 0009, creator
  ``SYNTH_VENDOR``) repeating the patient's name, ID and birth date.
- Each lesion is rendered on both views but delineated on one: the view where it is less attenuated.
- Labels: each lesion's features (site, irregularity, contrast, size, symmetric pair) are drawn from
  its intended class; a latent score weighs those features and the patient's burden, and the label
  is the sign of score + Gaussian noise, which flips ~14 % of labels against the noise-free sign
  (a logistic regression on the true features reaches ~85 % accuracy, so a CNN can learn it, not
  trivially). Targets met on large archives: ~50 % malignant lesions, ~44 % metastatic patients,
  4.4 lesions per study (few 63 %, medium 17 %, extensive 21 % of studies).
- The study-level mix (tumour type, metastatic intent, lesion burden, unannotated studies) comes
  from low-discrepancy sequences, so even small archives sit near the target shares.
"""

from wbs_dist.schema import VIEWS
from wbs_dist.synth.archive import ARCHIVE_FORMS, annotation_rows, mask_png, write_archive
from wbs_dist.synth.body import COLS, PIXEL_SPACING_MM, ROWS, anatomy
from wbs_dist.synth.dicom import (NM_IMAGE_STORAGE, VIEW_CODES, VIEW_TEXT, encode, study_datasets,
                                  study_files)
from wbs_dist.synth.lesions import Lesion
from wbs_dist.synth.plan import (ANNOTATED_FRACTION, FORM_CYCLE, FORMS, SKIPPED_FORMS, TUMOR_WEIGHTS,
                                 Acquisition, Patient, StudyPlan, followup_patients, form_for_index, plan_study,
                                 synth_uid)
from wbs_dist.synth.render import Study, make_study, render_study

__all__ = [
    "ANNOTATED_FRACTION", "ARCHIVE_FORMS", "COLS", "FORMS", "FORM_CYCLE", "NM_IMAGE_STORAGE", "PIXEL_SPACING_MM",
    "ROWS", "SKIPPED_FORMS", "TUMOR_WEIGHTS", "VIEWS", "VIEW_CODES", "VIEW_TEXT",
    "Acquisition", "Lesion", "Patient", "Study", "StudyPlan",
    "anatomy", "annotation_rows", "encode", "followup_patients", "form_for_index", "make_study", "mask_png", "plan_study",
    "render_study", "study_datasets", "study_files", "synth_uid", "write_archive",
]
