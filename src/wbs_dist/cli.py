"""The `wbs-dist` command: parse, dispatch, map errors to exit statuses (DESIGN 3.1).

Each stage exposes typed functions that return data (data.ingest.ingest, train.trainer.train_fold,
launch.cv.cross_validate, infer.score.score_archive, evaluate.report.write_report, ...); this file
alone parses arguments, calls them, prints what they return and maps errors to exit statuses:
0 success, 2 usage or config error, 3 finished but some inputs were skipped, 1 anything else.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections import Counter
from pathlib import Path

from wbs_dist.cli_parser import build_parser
from wbs_dist.errors import EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, UsageError, WbsError

log = logging.getLogger("wbs_dist")


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

    s = write_archive(args.out, args.patients, args.seed, args.form, followups=args.followups)
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
               max_object_mb=args.max_object_mb, max_views=args.max_views,
               accept_burned_in=args.accept_burned_in, shard=args.shard, wait_lock_s=args.wait_lock,
               batch_studies=args.batch_studies)
    if r.shard is not None:
        print(f"store {r.store}, shard {r.shard[0]}/{r.shard[1]}: {r.written} studies written, {r.already} already "
              "there; when every shard has ended, run the same command without --shard to finalize")
        return _skipped("ingest", r.errors, r.errors_path)
    c = r.counts
    print(f"store {r.store}: {c['studies']} studies ({r.written} new, {r.already} already there), "
          f"{c['annotated_studies']} annotated, {c['lesions']} lesions ({c['malignant_lesions']} malignant)")
    return _skipped("ingest", r.errors, r.errors_path)


def _cmd_folds(args) -> int:
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.store import Store

    store = Store.open(args.store)
    info = write_folds(store, args.k, args.seed, args.force)
    print(f"{args.k} folds (seed {args.seed}, stratified on {info['stratified_on']}) written to {store.path}/folds; "
          f"split {info['fingerprint']} (runs record it, and refuse another)")
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
    if r.detection:
        p = r.detection["pooled"]
        print(f"detection, pooled at each fold's threshold: sensitivity {100 * p['sensitivity']:.1f} % "
              f"({p['found']}/{p['lesions']} lesions), {p['fp_per_study']:.2f} false positives per study")
        if (c := r.detection.get("classical")) and c["sensitivity"] is not None:
            print(f"hot-spot finder on the same studies: sensitivity {100 * c['sensitivity']:.1f} % "
                  f"({c['found']}/{c['lesions']} lesions), {c['fp_per_study']:.2f} false positives per study")
    print(f"[cv] report: {r.report_dir / 'report.html'} (metrics: {r.report_dir / 'metrics.json'})")
    return EXIT_OK


def _cmd_tune(args) -> int:
    from wbs_dist.launch.tune import load_tune, tune
    from wbs_dist.launch.tune_results import OBJECTIVES, metric, results_markdown

    spec, base = load_tune(args.config, args.overrides)
    if spec.nested:
        return _nested(spec, base)
    r = tune(spec, base)
    print(results_markdown(r.rows, base.folds, base.task))
    print(f"results: {r.experiment / 'results.csv'}, {r.experiment / 'results.md'}")
    if r.best is None:
        raise WbsError(f"no trial ran its {spec.max_epochs} epochs: no best config")
    print(f"best: {r.experiment / 'best.yaml'} (lr {r.best['lr']:.3g}, batch {r.best['batch_size']}, "
          f"{OBJECTIVES[base.task][1]} {r.best[metric(base.task)]:.4f}); train it with `wbs-dist cv {r.experiment / 'best.yaml'}`. Its report "
          "will say that lr and batch were chosen on the folds it grades (optimistic); nested=true grades them on "
          "folds the choice never saw")
    return EXIT_SKIPPED if r.errored else EXIT_OK


def _nested(spec, base) -> int:
    from wbs_dist.evaluate.report import headline
    from wbs_dist.launch.nested import nested_tune

    r = nested_tune(spec, base)
    for c in r.outer:
        print(f"outer fold {c['outer_fold']}: lr {c['lr']:.3g}, batch {c['batch_size']} (trial {c['trial']}, inner mean "
              f"val AUC {c['inner_mean_val_auc']:.4f}, {c['trials']} trials)")
    for run in r.runs:
        print(headline(run) + " (nested: graded on outer folds the search never saw)")
    print(f"report: {r.report_dir / 'report.html'}; choices {r.experiment / 'nested.json'}")
    return EXIT_SKIPPED if any(c["errored"] for c in r.outer) else EXIT_OK


def _cmd_demo(args) -> int:
    from wbs_dist.demo import run_demo
    from wbs_dist.infer.parts import summary_path

    r = run_demo(args.out, patients=args.patients, seed=args.seed, workers=args.workers)
    pooled, mean = r.metrics["lesion"]["pooled"], r.metrics["lesion"]["mean"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    print(f"[demo] scores: {r.scores} (per study: {summary_path(r.scores)})")
    cv, scored = r.patient_level["cv"], r.patient_level["scored"]

    def show(m):
        auc = "n/a" if m["auc"] is None else format(m["auc"], ".3f")
        return ", ".join([f"n {m['n']}", f"AUC {auc}", *(f"{k} {pct(m[k])}" for k in ("sensitivity", "specificity",
                                                                                          "accuracy"))])
    print(f"[demo] patient level, cross-validation:               {show(cv)}")
    print(f"[demo] patient level, training archive out-of-fold:   {show(scored)} "
          f"({'equal' if r.patient_level['equal'] else 'DIFFERENT: out-of-fold scoring does not reproduce the cv'})")
    d = r.detection["pooled"]
    print(f"[demo] lesion detector, pooled over its validation folds at their thresholds: sensitivity "
          f"{pct(d['sensitivity'])} ({d['found']}/{d['lesions']}), {d['fp_per_study']:.2f} false positives a study")
    if (c := r.detection.get("classical")) and c["sensitivity"] is not None:
        print(f"[demo] hot-spot finder on the same studies and level:  sensitivity {pct(c['sensitivity'])} "
              f"({c['found']}/{c['lesions']}), {c['fp_per_study']:.2f} false positives a study")
    print("[demo] held-out archive, patient-level AUC by where the lesions come from: " + ", ".join(
        f"{name} {'n/a' if c['auc'] is None else format(c['auc'], '.3f')} ({c['lesions_per_study']:.1f} a study)"
        for name, c in r.candidates.items()))
    print(f"[demo] report: {r.report}")
    print(f"[demo] lesion level, mean of {r.folds} folds: accuracy {pct(mean['accuracy'])}, sensitivity "
          f"{pct(mean['sensitivity'])}, specificity {pct(mean['specificity'])}, AUC "
          f"{'n/a' if mean['auc'] is None else format(mean['auc'], '.3f')}; pooled n = {pooled['n']}")
    return EXIT_OK if r.patient_level["equal"] else EXIT_FAILURE


def _cmd_report(args) -> int:
    from wbs_dist.evaluate.analysis import parse_threshold
    from wbs_dist.evaluate.report import headline, write_report

    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap: expected 0 (off) or a number of replicates, got {args.bootstrap}")
    if args.seed < 0:
        raise UsageError(f"--seed: expected a number >= 0, got {args.seed}")
    runs = write_report(args.predictions, args.out, parse_threshold(args.threshold),
                        bootstrap=args.bootstrap, seed=args.seed)
    for run in runs:
        print(headline(run))
    print(f"report: {args.out / 'report.html'}")
    return EXIT_OK


def _cmd_score(args) -> int:
    from wbs_dist.infer.score import score_archive

    r = score_archive(args.archive, run=args.run, out=args.out, fold=args.fold, shard=args.shard,
                      overlays=args.overlays, workers=args.workers, batch=args.batch,
                      annotations=args.annotations, part_size=args.part_size,
                      max_object_mb=args.max_object_mb, max_views=args.max_views, store=args.store,
                      secret_file=args.secret_file, detector=args.detector, candidates_from=args.candidates)
    if r.unrecognised:
        print(f"WARNING: patients the run trained on cannot be recognised ({r.unrecognised}). Any of them in this "
              "archive were scored by models that trained on them: their scores are in-sample, not an estimate "
              "of performance.", file=sys.stderr)
    elif r.known:
        print(f"{r.known} studies are of patients the run trained on: each scored by the fold that held its patient "
              "out (fold column), as in cross-validation; the rest by the ensemble")
    if r.shard is not None:
        print(f"shard {r.shard[0]}/{r.shard[1]}: {r.scored} studies scored ({r.already} already done), "
              f"{r.lesions} lesions, {r.seconds:.1f} s; run without --shard to write {r.out}")
    else:
        print(f"{r.out}: {r.merged[0]} studies, {r.merged[1]} lesions ({r.scored} studies scored now, {r.already} "
              f"already done, {r.seconds:.1f} s); summary {r.summary_path}")
    return _skipped("score", r.errors, r.errors_path, "not scored")


COMMANDS = {"synth": _cmd_synth, "ingest": _cmd_ingest, "folds": _cmd_folds, "train": _cmd_train, "cv": _cmd_cv,
            "tune": _cmd_tune, "demo": _cmd_demo, "report": _cmd_report, "score": _cmd_score}

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
                return int(COMMANDS[args.command](args) or 0)
        return int(COMMANDS[args.command](args) or 0)
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
