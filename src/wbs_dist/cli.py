"""The `wbs-dist` command: parse, dispatch, map errors to exit statuses (DESIGN 3.1).

Each subcommand lives in the module that owns the concept; this file only wires arguments to a
`run_*` function and turns `WbsError` into a one-line message. Exit statuses: 0 success, 2 usage or
config error, 3 finished but some inputs were skipped, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_FAILURE, EXIT_USAGE, WbsError

log = logging.getLogger("wbs_dist")


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on usage errors already; keep that, but make the message one line.
    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        print(f"wbs-dist: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _cmd_synth(args) -> int:
    from .synth import run_synth

    return run_synth(args.out, patients=args.patients, seed=args.seed, form=args.form)


def _cmd_ingest(args) -> int:
    from .ingest import run_ingest

    return run_ingest(
        args.archive,
        store=args.store,
        annotations=args.annotations,
        secret_file=args.secret_file,
        workers=args.workers,
        train_size=args.train_size,
        errors_path=args.errors,
    )


def _cmd_folds(args) -> int:
    from .folds import run_folds

    return run_folds(args.store, k=args.k, seed=args.seed, force=args.force)


def _cmd_train(args) -> int:
    from .train import run_train

    return run_train(args.config, args.overrides, fold=args.fold, resume=args.resume)


def _cmd_cv(args) -> int:
    from .cv import run_cv

    return run_cv(args.config, args.overrides, launcher=args.launcher)


def _cmd_tune(args) -> int:
    from .tune import run_tune

    return run_tune(args.config, args.overrides)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, patients=args.patients, seed=args.seed, workers=args.workers)


def _cmd_report(args) -> int:
    from .report import run_report

    return run_report(args.predictions, out=args.out, threshold=args.threshold)


def _cmd_score(args) -> int:
    from .score import run_score

    return run_score(args.archive, run=args.run, out=args.out, fold=args.fold, shard=args.shard,
                     overlays=args.overlays, workers=args.workers, batch=args.batch,
                     annotations=args.annotations, part_size=args.part_size)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 512x256, got {text!r}")
    if h < 8 or w < 8 or w % 2:
        raise argparse.ArgumentTypeError(f"size {text!r}: both sides >= 8 and an even width (two views)")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wbs-dist", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"wbs-dist {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("synth", help="write a synthetic whole-body bone-scan DICOM archive",
                       description="Write a synthetic archive that looks like a hospital export: NM "
                       "whole-body DICOM in the forms converters meet, annotations.csv and lesion masks.")
    s.add_argument("out", type=Path, help="output folder, or a path ending in .zip / .tar / .tar.gz")
    s.add_argument("--patients", type=int, default=100, help="number of patients (default 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the archive is deterministic for it")
    s.add_argument("--form", choices=["dir", "zip", "tar"], default=None,
                   help="archive form (default: from OUT's suffix, else a folder)")
    s.set_defaults(func=_cmd_synth)

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
    s.add_argument("--train-size", type=_size, default=(512, 256),
                   help="training-resolution level HEIGHTxWIDTH, both views side by side (default 512x256)")
    s.add_argument("--errors", type=Path, default=None,
                   help="CSV listing skipped inputs and reasons (default: STORE.errors.csv beside the store)")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("folds", help="patient-grouped stratified k-fold split, written into the store",
                       description="Split the store's annotated patients into k folds (grouped by patient, "
                       "stratified on patient malignancy and tumour type) and write them into the store.")
    s.add_argument("store", type=Path, help="Zarr store written by `wbs-dist ingest`")
    s.add_argument("--k", type=int, default=5, help="number of folds (default 5, as in the study)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.add_argument("--force", action="store_true", help="replace existing folds (results depend on them)")
    s.set_defaults(func=_cmd_folds)

    s = sub.add_parser("train", help="train one fold (one process, or one rank under torchrun/srun)",
                       description="Train on the other folds and validate on fold K every epoch. Under torchrun "
                       "or srun the same command runs DDP (ranks from the environment). Resumes automatically "
                       "from RUN_DIR/fold<K>/last.pt; exits 75 when preempted (SIGUSR2/SIGTERM) after saving.")
    s.add_argument("config", type=Path, help="YAML config, e.g. configs/baseline.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, checked")
    s.add_argument("--fold", type=int, required=True, help="validation fold K")
    s.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("cv", help="all folds (locally or as SLURM jobs), then the report",
                       description="Run the k folds of the cross-validation and write RUN_DIR/predictions.csv "
                       "and RUN_DIR/report/. --launcher slurm submits a job array through submitit (one DDP "
                       "job per fold), requeues preempted folds and retries failed ones. Finished folds are skipped.")
    s.add_argument("config", type=Path, help="YAML config, e.g. configs/baseline.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, checked")
    s.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: folds in turn in this process; slurm: a job array via submitit")
    s.set_defaults(func=_cmd_cv)

    s = sub.add_parser("tune", help="Ray Tune over learning rate x batch size, all folds per trial",
                       description="Search lr and batch size around a training config with Ray Tune and ASHA: "
                       "each trial trains every fold interleaved epoch by epoch and reports the mean validation "
                       "AUC. Writes results.csv/.md and best.yaml (a config for `train`/`cv`) into the "
                       "experiment directory. Rerun the same command to resume an interrupted sweep. Connects "
                       "to the Ray cluster in RAY_ADDRESS (slurm/tune.sh), else starts a local one.")
    s.add_argument("config", type=Path, help="tune YAML, e.g. configs/tune.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="tune key overrides (num_samples=8); training config keys as train.<key> (train.epochs=3)")
    s.set_defaults(func=_cmd_tune)

    s = sub.add_parser("demo", help="the whole pipeline on a built-in synthetic archive",
                       description="Synthesise an archive, ingest it and print what was made: the README's "
                       "first command. Rerunning reuses what is already there.")
    s.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    s.add_argument("--patients", type=int, default=60, help="synthetic patients (default 60)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic archive")
    s.add_argument("--workers", type=int, default=2, help="ingest processes (default 2)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("report", help="metrics, tables and plots from predictions CSVs",
                       description="Compute the study's statistics from one or more predictions CSVs "
                       "(DESIGN 3.3) and write metrics.json, Markdown tables, plots and an HTML report.")
    s.add_argument("predictions", type=Path, nargs="+", help="predictions CSV(s); several = one run each")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--threshold", default="0.5",
                   help="decision threshold: a number in [0,1], or 'youden' (chosen on training folds only)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("score", help="score an archive's lesions with a run's fold ensemble",
                       description="Score every lesion of a DICOM archive (folder, .zip, .tar) with the mean "
                       "probability of a run's finished fold models: annotated lesions where the archive has "
                       "annotations, hot-spot candidates elsewhere. Writes PRED.csv (DESIGN 3.3), "
                       "PRED.summary.csv (one row per study) and PRED.errors.csv. The output carries the "
                       "original Study Instance UIDs and Patient IDs: it is identifying, for the site. "
                       "Resumable (rerun to finish); with --shard I/N it scores one shard into PRED.csv.parts/ "
                       "and the same command without --shard merges the shards (see slurm/score.sh).")
    s.add_argument("archive", type=Path, help="folder, .zip, .tar, .tar.gz or .tgz of DICOM studies")
    s.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                   help="run directory holding fold<K>/ (done.json, last.pt, config.yaml)")
    s.add_argument("--out", type=Path, required=True, metavar="PRED.csv", help="predictions CSV to write")
    s.add_argument("--fold", type=int, default=None, metavar="K",
                   help="score with fold K only (default: every finished fold)")
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
    s.set_defaults(func=_cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (`train CFG --fold 0 lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except WbsError as exc:
        print(f"wbs-dist {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"wbs-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a bad input: keep the traceback for the report
        if args.verbose:
            raise
        log.exception("wbs-dist %s failed: %s", args.command, exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
