"""The `wbs-dist` command's arguments: one sub-parser per stage, with its help. cli.py dispatches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wbs_dist import __version__
from wbs_dist.errors import EXIT_USAGE




class Parser(argparse.ArgumentParser):
    # argparse exits 2 on usage errors already; keep that, but make the message one line.
    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        print(f"wbs-dist: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _size(text: str):
    from wbs_dist.config import Size

    try:
        return Size.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
        return value
    return parse


def _add_budgets(s: argparse.ArgumentParser) -> None:
    """Ingest and score refuse, as listed errors, inputs beyond these before decoding them."""
    s.add_argument("--max-object-mb", type=_positive(float), default=256, metavar="MB",
                   help="largest pixel data (MiB) a DICOM object, and a study, may declare: rows x columns x "
                   "frames x bytes, checked from the header before decoding; archive members may be this plus "
                   "64 MiB (default 256; a whole-body NM object is about 1)")
    s.add_argument("--max-views", type=_positive(int), default=8, metavar="N",
                   help="most views (frames) one study may declare (default 8)")


def _config_epilog() -> str:
    from wbs_dist.config import help_text

    return ("config keys (in the YAML file, or key=value after it; keys marked [may change on resume] can differ "
            "when a fold resumes, the others are refused):\n" + help_text())


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="wbs-dist", description="Whole-body bone scintigraphy: DICOM ingest, patient-grouped cross-validation, "
               "SLURM and Ray launch, archive scoring.")
    p.add_argument("--version", action="version", version=f"wbs-dist {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("synth", help="write a synthetic whole-body bone-scan DICOM archive",
                       description="Write a synthetic archive that looks like a hospital export: NM "
                       "whole-body DICOM in the forms converters meet, annotations.csv and lesion masks.")
    s.add_argument("out", type=Path, help="output folder, or a path ending in .zip / .tar / .tar.gz")
    s.add_argument("--patients", type=int, default=100, help="number of patients (default 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the archive is deterministic for it")
    s.add_argument("--form", choices=["dir", "zip", "tar"], default=None,
                   help="archive form (default: from OUT's suffix, else a folder)")
    s.add_argument("--followups", type=float, default=0.0,
                   help="follow-up scans per patient, on average (default 0: one study a patient); e.g. 0.5 "
                   "adds half as many studies again, of patients drawn at random, some seen three times")

    s = sub.add_parser("ingest", help="DICOM archive + annotations -> de-identified Zarr store",
                       description="Read a folder, .zip or .tar(.gz) of whole-body bone scans and write a "
                       "chunked, de-identified Zarr v3 store. Resumable: rerun to finish an interrupted run.")
    s.add_argument("archive", type=Path, help="folder, .zip, .tar, .tar.gz or .tgz")
    s.add_argument("--store", type=Path, required=True, help="Zarr store to create or complete")
    s.add_argument("--annotations", type=Path, default=None,
                   help="folder holding annotations.csv and masks/ (default: inside the archive)")
    s.add_argument("--secret-file", type=Path, default=None,
                   help="HMAC secret for pseudonyms, kept outside the store (default: "
                   "$WBS_DIST_SECRET_FILE or ~/.config/wbs_dist/secret; created 0600 on first use)")
    s.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    s.add_argument("--train-size", type=_size, default="512x256",
                   help="training-resolution level HEIGHTxWIDTH, both views side by side (default 512x256)")
    s.add_argument("--accept-burned-in", action="store_true",
                   help="also store studies whose objects say Burned In Annotation YES (text such as a name in "
                   "the pixels): the store is then NOT de-identified. Default: listed in the errors CSV, not stored")
    s.add_argument("--errors", type=Path, default=None,
                   help="CSV listing skipped inputs and reasons (default: STORE.errors.csv beside the store; "
                   "STORE.errors.shard-I-of-N.csv for a shard)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="write only the studies whose Study Instance UID hashes to I mod N, while other shards "
                   "write theirs into the same store; then the same command without --shard finalizes (writes "
                   "what the shards left undone, rebuilds the lesion table). See slurm/ingest.sh")
    s.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for the store lock held by another ingest (or its shards) instead of "
                   "being refused at once (default 0)")
    s.add_argument("--batch-studies", type=_positive(int), default=64, metavar="N",
                   help="studies written together as one batch of 9 files (default 64): fewer files for a parallel "
                   "filesystem; a killed run redoes at most the batch it was filling")
    _add_budgets(s)

    s = sub.add_parser("folds", help="patient-grouped stratified k-fold split, written into the store",
                       description="Split the store's annotated patients into k folds (grouped by patient, "
                       "stratified on patient malignancy and tumour type) and write them into the store.")
    s.add_argument("store", type=Path, help="Zarr store written by `wbs-dist ingest`")
    s.add_argument("--k", type=int, default=5, help="number of folds (default 5, as in the study)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.add_argument("--force", action="store_true", help="replace existing folds (results depend on them)")

    s = sub.add_parser("train", help="train one fold (one process, or one rank under torchrun/srun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(),
                       description="Train on the other folds and validate on fold K every epoch. Under torchrun "
                       "or srun the same command runs DDP (ranks from the environment). Resumes automatically "
                       "from RUN_DIR/fold<K>/last.pt; exits 75 when preempted (SIGUSR2/SIGTERM) after saving.")
    s.add_argument("config", type=Path, help="YAML config, e.g. configs/baseline.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, checked")
    s.add_argument("--fold", type=int, required=True, help="validation fold K")
    s.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")

    s = sub.add_parser("cv", help="all folds (locally or as SLURM jobs), then the report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(),
                       description="Run the k folds of the cross-validation and write RUN_DIR/predictions.csv "
                       "and RUN_DIR/report/. --launcher slurm submits a job array through submitit (one DDP "
                       "job per fold), requeues preempted folds and retries failed ones. Finished folds are skipped.")
    s.add_argument("config", type=Path, help="YAML config, e.g. configs/baseline.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, checked")
    s.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: folds in turn in this process; slurm: a job array via submitit")

    s = sub.add_parser("tune", help="Ray Tune over learning rate x batch size, all folds per trial",
                       description="Search lr and batch size around a training config with Ray Tune and ASHA: "
                       "each trial trains every fold interleaved epoch by epoch and reports the mean validation "
                       "AUC. Writes results.csv/.md and best.yaml (a config for `train`/`cv`) into the "
                       "experiment directory. Rerun the same command to resume an interrupted sweep. Connects "
                       "to the Ray cluster in RAY_ADDRESS (slurm/tune.sh), else starts a local one.")
    s.add_argument("config", type=Path, help="tune YAML, e.g. configs/tune.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="tune key overrides (num_samples=8); training config keys as train.<key> (train.epochs=3)")

    s = sub.add_parser("demo", help="the whole pipeline on a built-in synthetic archive",
                       description="The README's first command: synthesise an archive, ingest it, run the "
                       "five-fold cross-validation locally with configs/local.yaml, write the report, cross-validate "
                       "the lesion detector (configs/detect_local.yaml), score a held-out synthetic archive with the "
                       "fold models, score the training archive out-of-fold (its patient-level figures must equal the "
                       "cross-validation's), and score the held-out archive again from the detector's and the "
                       "hot-spot finder's lesions. Rerunning reuses what is already there.")
    s.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    s.add_argument("--patients", type=int, default=60, help="synthetic patients (default 60)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic archive")
    s.add_argument("--workers", type=int, default=2, help="ingest processes (default 2)")

    s = sub.add_parser("report", help="metrics, tables and plots from predictions CSVs",
                       description="Compute the study's statistics from one or more predictions CSVs "
                       "(DESIGN 3.3) and write metrics.json, Markdown tables, plots and an HTML report.")
    s.add_argument("predictions", type=Path, nargs="+", help="predictions CSV(s); several = one run each")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--threshold", default="0.5",
                   help="decision threshold: a number in [0,1], or 'youden' (chosen on training folds only)")
    s.add_argument("--bootstrap", type=int, default=2000, metavar="B",
                   help="patient-cluster bootstrap replicates for the intervals, and permutations for the "
                   "subgroups' cluster test (default 2000; 0 = off)")
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations (default 0)")

    s = sub.add_parser("score", help="score an archive's lesions with a run's fold ensemble",
                       description="Score every lesion of a DICOM archive (folder, .zip, .tar) with the mean "
                       "probability of a run's finished fold models: annotated lesions where the archive has "
                       "annotations, hot-spot candidates elsewhere. Writes PRED.csv (DESIGN 3.3), "
                       "PRED.summary.csv (one row per study) and PRED.errors.csv. The output carries the "
                       "original Study Instance UIDs and Patient IDs: it is identifying, for the site. "
                       "Resumable (rerun to finish); with --shard I/N it scores one shard into PRED.csv.parts/ "
                       "and the same command without --shard merges the shards (see slurm/score.sh). Out-of-fold "
                       "rule: a study whose patient is in the run's store (recognised under the site secret) is "
                       "scored by the model of the patient's validation fold alone, named in the fold column; "
                       "scoring the training archive reproduces the cross-validation's predictions.")
    s.add_argument("archive", type=Path, help="folder, .zip, .tar, .tar.gz or .tgz of DICOM studies")
    s.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                   help="run directory holding fold<K>/ (done.json, last.pt, config.yaml)")
    s.add_argument("--out", type=Path, required=True, metavar="PRED.csv", help="predictions CSV to write")
    s.add_argument("--fold", type=int, default=None, metavar="K",
                   help="score with fold K only (default: every finished fold); known patients of other "
                   "folds are then listed as not scored")
    s.add_argument("--detector", type=Path, default=None, metavar="RUN_DIR",
                   help="a run of task=detect folds: studies without annotations get the detector ensemble's "
                   "lesions (mean map, the folds' training-chosen threshold, components) instead of the "
                   "classical hot-spot finder's")
    s.add_argument("--candidates", choices=("learned", "classical"), default=None,
                   help="where a study without annotations gets its lesions (default: learned with --detector, "
                   "else classical)")
    s.add_argument("--store", type=Path, default=None,
                   help="the run's store, to recognise patients it trained on (default: the run's config key "
                   "'store')")
    s.add_argument("--secret-file", type=Path, default=None,
                   help="the secret the store was ingested under (default: $WBS_DIST_SECRET_FILE or "
                   "~/.config/wbs_dist/secret; never created here)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="score only the studies whose uid hashes to I mod N (0 <= I < N); parts only, no CSV")
    s.add_argument("--overlays", type=Path, default=None, metavar="DIR",
                   help="write DIR/<study_uid>.png: views with lesion contours coloured by score")
    s.add_argument("--annotations", type=Path, default=None, metavar="DIR",
                   help="folder holding annotations.csv and masks/ (default: inside the archive)")
    s.add_argument("--workers", type=int, default=2, metavar="N",
                   help="decoding processes (default 2; 0 = in-process)")
    s.add_argument("--batch", type=int, default=32, metavar="B",
                   help="lesions per forward pass, across studies (default 32)")
    s.add_argument("--part-size", type=int, default=64, metavar="N",
                   help="studies per results part file (default 64); a kill loses at most the unwritten ones")
    _add_budgets(s)
    return p
