"""The `wbs-dist` command: parse, dispatch, map errors to exit statuses (DESIGN 3.1).

Each stage exposes typed functions that return data (data.ingest.ingest, train.trainer.train_fold,
launch.cv.cross_validate, infer.score.score_archive, evaluate.report.write_report, ...); this file
alone parses arguments, calls them, prints what they return and maps errors to exit statuses:
0 success, 2 usage or config error, 3 finished but some inputs were skipped, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections import Counter
from pathlib import Path

from wbs_dist import __version__
from wbs_dist.errors import EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, WbsError

log = logging.getLogger("wbs_dist")


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on usage errors already; keep that, but make the message one line.
    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        print(f"wbs-dist: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _skipped(command: str, errors: list[tuple[str, str]], path: Path, verb: str = "skipped") -> int:
    """List inputs that were skipped with their reasons (a count per reason, the first 20); exit 3."""
    if not errors:
        return EXIT_OK
    kinds = Counter(reason.split(" (")[0].split(":")[0] for _, reason in errors)
    print(f"wbs-dist {command}: {len(errors)} input(s) {verb}, listed with reasons in {path}:", file=sys.stderr)
    for reason, n in kinds.most_common(12):
        print(f"  {n:6d}  {reason}", file=sys.stderr)
    for p, reason in errors[:20]:
        print(f"  {p}: {reason}", file=sys.stderr)
    if len(errors) > 20:
        print(f"  ... and {len(errors) - 20} more", file=sys.stderr)
    return EXIT_SKIPPED


def _cmd_synth(args) -> int:
    from wbs_dist.schema import STUDY_TUMOR_TYPES
    from wbs_dist.synth import write_archive

    s = write_archive(args.out, args.patients, args.seed, args.form)
    forms = ", ".join(f"{k} {v}" for k, v in s["dicom_forms"].items())
    types = ", ".join(f"{t} {s['tumor_types'].get(t, 0)}" for t in STUDY_TUMOR_TYPES)
    print(f"wrote {s['out']} ({s['archive_form']}, {s['bytes'] / 1e6:.1f} MB)")
    print(f"  patients {s['patients']}, studies {s['studies']} ({s['annotated_studies']} annotated), "
          f"lesions {s['lesions']}")
    print(f"  malignant lesions {100 * s['malignant_lesion_fraction']:.1f} %, "
          f"patients with metastasis {100 * s['metastatic_patient_fraction']:.1f} %; tumour types: {types}")
    print(f"  DICOM files {s['dicom_files']}, mask PNGs {s['masks']}; studies by DICOM form: {forms}")
    return EXIT_OK


def _cmd_ingest(args) -> int:
    from wbs_dist.data.ingest import ingest

    r = ingest(args.archive, store=args.store, annotations=args.annotations, secret_file=args.secret_file,
               workers=args.workers, train_size=args.train_size, errors_path=args.errors,
               max_object_mb=args.max_object_mb, max_views=args.max_views)
    c = r.counts
    print(f"store {r.store}: {c['studies']} studies ({r.written} new, {r.already} already there), "
          f"{c['annotated_studies']} annotated, {c['lesions']} lesions ({c['malignant_lesions']} malignant)")
    return _skipped("ingest", r.errors, r.errors_path)


def _cmd_folds(args) -> int:
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.store import Store

    store = Store.open(args.store)
    info = write_folds(store, args.k, args.seed, args.force)
    print(f"{args.k} folds (seed {args.seed}, stratified on {info['stratified_on']}) written to {store.path}/folds")
    print(f"{'fold':>4} {'patients':>9} {'% malig.':>10} {'lesions':>8} {'% malig.':>10}  tumour types")
    for c in info["counts"]:
        tt = ", ".join(f"{t} {n}" for t, n in c["tumor_types"].items() if n)
        print(f"{c['fold']:>4} {c['patients']:>9} {c['malignant_patients'] / max(c['patients'], 1):>9.1%} "
              f"{c['lesions']:>8} {c['malignant_lesions'] / max(c['lesions'], 1):>9.1%}  {tt}")
    return EXIT_OK


def _cmd_train(args) -> int:
    from wbs_dist.config import load_config

    cfg = load_config(args.config, args.overrides)      # a bad config fails before torch is imported
    from wbs_dist.train.ddp import detect
    from wbs_dist.train.trainer import train_fold

    result = train_fold(cfg, args.fold, require_resume=args.resume)
    if detect().is_main:
        auc = "n/a" if result.val_auc is None else f"{result.val_auc:.4f}"
        print(f"fold {args.fold}: {result.epochs} epochs, validation AUC {auc}; predictions {result.predictions}")
    return EXIT_OK


def _cmd_cv(args) -> int:
    from wbs_dist.config import load_config

    cfg = load_config(args.config, args.overrides)      # a bad config fails before anything heavy loads
    from wbs_dist.evaluate.report import headline
    from wbs_dist.launch.cv import cross_validate

    r = cross_validate(cfg, launcher=args.launcher)
    for run in r.runs:
        print(headline(run))
    print(f"[cv] report: {r.report_dir / 'report.html'} (metrics: {r.report_dir / 'metrics.json'})")
    return EXIT_OK


def _cmd_tune(args) -> int:
    from wbs_dist.launch.tune import METRIC, load_tune, results_markdown, tune

    spec, base = load_tune(args.config, args.overrides)
    r = tune(spec, base)
    print(results_markdown(r.rows, base.folds))
    print(f"results: {r.experiment / 'results.csv'}, {r.experiment / 'results.md'}")
    if r.best is None:
        raise WbsError(f"no trial ran its {spec.max_epochs} epochs: no best config")
    print(f"best: {r.experiment / 'best.yaml'} (lr {r.best['lr']:.3g}, batch {r.best['batch_size']}, "
          f"mean val AUC {r.best[METRIC]:.4f}); train it with `wbs-dist cv {r.experiment / 'best.yaml'}`")
    return EXIT_SKIPPED if r.errored else EXIT_OK


def _cmd_demo(args) -> int:
    from wbs_dist.demo import run_demo
    from wbs_dist.infer.parts import summary_path

    r = run_demo(args.out, patients=args.patients, seed=args.seed, workers=args.workers)
    pooled, mean = r.metrics["lesion"]["pooled"], r.metrics["lesion"]["mean"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    print(f"[demo] scores: {r.scores} (per study: {summary_path(r.scores)})")
    print(f"[demo] 5/5 report: {r.report}")
    print(f"[demo] lesion level, mean of {r.folds} folds: accuracy {pct(mean['accuracy'])}, sensitivity "
          f"{pct(mean['sensitivity'])}, specificity {pct(mean['specificity'])}, AUC "
          f"{'n/a' if mean['auc'] is None else format(mean['auc'], '.3f')}; pooled n = {pooled['n']}")
    return EXIT_OK


def _cmd_report(args) -> int:
    from wbs_dist.evaluate.analysis import parse_threshold
    from wbs_dist.evaluate.report import headline, write_report

    runs = write_report(args.predictions, args.out, parse_threshold(args.threshold))
    for run in runs:
        print(headline(run))
    print(f"report: {args.out / 'report.html'}")
    return EXIT_OK


def _cmd_score(args) -> int:
    from wbs_dist.infer.score import score_archive

    r = score_archive(args.archive, run=args.run, out=args.out, fold=args.fold, shard=args.shard,
                      overlays=args.overlays, workers=args.workers, batch=args.batch,
                      annotations=args.annotations, part_size=args.part_size,
                      max_object_mb=args.max_object_mb, max_views=args.max_views)
    if r.shard is not None:
        print(f"shard {r.shard[0]}/{r.shard[1]}: {r.scored} studies scored ({r.already} already done), "
              f"{r.lesions} lesions, {r.seconds:.1f} s; run without --shard to write {r.out}")
    else:
        print(f"{r.out}: {r.merged[0]} studies, {r.merged[1]} lesions ({r.scored} studies scored now, {r.already} "
              f"already done, {r.seconds:.1f} s); summary {r.summary_path}")
    return _skipped("score", r.errors, r.errors_path, "not scored")


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
    s.add_argument("--train-size", type=_size, default="512x256",
                   help="training-resolution level HEIGHTxWIDTH, both views side by side (default 512x256)")
    s.add_argument("--errors", type=Path, default=None,
                   help="CSV listing skipped inputs and reasons (default: STORE.errors.csv beside the store)")
    _add_budgets(s)
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
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(),
                       description="Train on the other folds and validate on fold K every epoch. Under torchrun "
                       "or srun the same command runs DDP (ranks from the environment). Resumes automatically "
                       "from RUN_DIR/fold<K>/last.pt; exits 75 when preempted (SIGUSR2/SIGTERM) after saving.")
    s.add_argument("config", type=Path, help="YAML config, e.g. configs/baseline.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, checked")
    s.add_argument("--fold", type=int, required=True, help="validation fold K")
    s.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("cv", help="all folds (locally or as SLURM jobs), then the report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(),
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
                       description="The README's first command: synthesise an archive, ingest it, run the "
                       "five-fold cross-validation locally with configs/local.yaml, write the report and score a "
                       "held-out synthetic archive with the fold models. Rerunning reuses what is already there.")
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
    _add_budgets(s)
    s.set_defaults(func=_cmd_score)
    return p


# Commands that SIGTERM (SLURM's time limit, scancel) stops cleanly: the signal becomes an exception,
# so every `with` block unwinds (the worker processes are terminated, a tar's extraction with its
# names and MRNs is removed) and a rerun finishes the work. `train` handles SIGTERM itself: it saves
# at the next step and exits 75 to be requeued.
STOPPABLE = ("ingest", "score")


class Terminated(BaseException):
    """Like KeyboardInterrupt, not an Exception: no reader of one input may take it for that input's
    error and carry on."""

    exit_code = 143                          # 128 + SIGTERM, as a shell reports a process it terminated


@contextlib.contextmanager
def _sigterm_stops():
    def handler(signum, frame):
        raise Terminated(f"stopped by {signal.Signals(signum).name}: nothing half-written is kept; rerun the "
                         "same command to finish")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        if args.command in STOPPABLE:
            with _sigterm_stops():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except WbsError as exc:
        print(f"wbs-dist {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"wbs-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"wbs-dist {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug, not a bad input: keep the traceback for the report
        if args.verbose:
            raise
        log.exception("wbs-dist %s failed: %s", args.command, exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
