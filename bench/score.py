"""bench/score: `wbs-dist score` end to end vs the same models on pre-decoded tensors, in one run.

Same archive, same fold models, same lesions, same batch size:
  end to end    the command as a user runs it (a subprocess): start-up, model load, header pass,
                decoding in worker processes, view identification, annotations or hot-spot
                candidates, training-level preprocessing, batched ensemble inference, parts, CSVs
  forward only  the ensemble's forward passes over the lesions' input tensors, built beforehand
                with the scorer's own worker code (not timed)
  decode only   the worker side alone (decode .. preprocessing) in the same number of processes:
                how fast the models could be fed, the ceiling on a fast accelerator
Target (issue 8): end-to-end studies/s >= 0.9 x forward-only studies/s (reading hidden behind
compute). Peak RSS: the largest process (getrusage of children), and the scorer's process tree
sampled every 0.2 s (main process + workers together).

The models are random-initialised (weights=none): speed does not depend on the weights. The study's
resnet50 at 512 x 256 runs ~0.25-0.6 s a lesion on 2 CPU cores, too slow for a bench of minutes
here; the default is resnet50 at 256 x 128 with 2 folds. Use --size 512x256 --folds 5 on a GPU node.

    .venv/bin/python bench/score.py [--studies 100] [--model resnet50] [--size 256x128] [--folds 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)


def make_run(run: Path, model: str, height: int, width: int, folds: int) -> None:
    """A run directory as training leaves it: fold<K>/{config.yaml, last.pt, done.json}."""
    from wbs_dist.config import load_config, dump_config
    from wbs_dist.train.models import build_model

    if all((run / f"fold{k}" / "done.json").exists() for k in range(folds)):
        return
    cfg = load_config(None, [f"model={model}", f"train_size={height}x{width}", "weights=none",
                             f"folds={max(folds, 2)}", f"run_dir={run}"])
    for k in range(folds):
        d = run / f"fold{k}"
        d.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(k)
        net = build_model(model, 3, "none", input_size=(height, width))
        torch.save({"format": 1, "model": net.state_dict(), "config": cfg.to_dict()}, d / "last.pt")
        dump_config(cfg, d / "config.yaml")
        (d / "done.json").write_text(json.dumps({"fold": k, "epochs": 0, "note": "bench: random weights"}))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(children.get(p, []))
    return total


def end_to_end(args, archive: Path, run: Path, out: Path) -> dict:
    shutil.rmtree(out.parent, ignore_errors=True)
    cmd = [sys.executable, "-m", "wbs_dist.cli", "score", str(archive), "--run", str(run), "--out", str(out),
           "--workers", str(args.workers), "--batch", str(args.batch)]
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def sample():
        while proc.poll() is None:
            samples.append((time.perf_counter() - t0, tree_rss(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"wbs-dist score exited {proc.returncode}:\n{stdout}")
    print(stdout.strip())
    # Bounded memory shows as a flat curve: the peak of each quarter of the run.
    quarters = [max((r for t, r in samples if q * seconds / 4 <= t < (q + 1) * seconds / 4), default=0) / 2**20
                for q in range(4)]
    return {"seconds": seconds, "tree_peak_rss_mb": max(quarters), "tree_peak_rss_mb_by_quarter": quarters,
            "largest_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def decode_only(args, archive: Path, height: int, width: int) -> tuple[dict, list]:
    """The scorer's worker side over every study, in args.workers spawned processes."""
    from wbs_dist.data.studies import StudySource, group_studies
    from wbs_dist.data.workers import StudyPool
    from wbs_dist.infer import score

    with StudySource.open(archive) as source, \
            StudyPool(source, args.workers, {"size": (height, width), "overlays": False}) as pool:
        members = source.members
        list(pool.headers(members[: 2 * args.workers], progress=False))  # workers started and warm
        t0 = time.perf_counter()
        errors: list = []
        studies = group_studies(pool.headers(members, progress=False), errors)
        jobs = [source.job(uid, "", uid, objs) for uid, objs in studies.items()]
        results = list(pool.executor.map(score._study_task, jobs, chunksize=1))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "studies": len(results)}, results


def forward_only(args, run: Path, results: list) -> tuple[dict, dict]:
    from wbs_dist.infer.ensemble import Ensemble
    from wbs_dist.preprocess import make_input, normalise

    ensemble = Ensemble(run)
    # The threads the scorer's main process uses beside its decoding processes (score._cpu_threads).
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - args.workers))
    keys, inputs = [], []
    for res in results:
        images = [normalise(scan.image, np.float32(scan.scale)) for scan in res.scans]
        for lid, _, _, scan in res.lesions:
            keys.append((res.uid, lid))
            inputs.append(make_input(images[scan], res.scans[scan].labels, lid, ensemble.config.other_lesions_channel))
    ensemble(np.stack(inputs[: args.batch]))  # first-call allocations, as the scorer's first batch pays them
    t0 = time.perf_counter()
    scores = []
    for i in range(0, len(inputs), args.batch):
        scores.append(ensemble(np.stack(inputs[i:i + args.batch])))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "lesions": len(inputs)}, dict(zip(keys, np.concatenate(scores)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", default="256x128", help="HEIGHTxWIDTH of the network input")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes (default 1: 2 cores, torch uses both)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/out/score"))
    ap.add_argument("--end-to-end-only", action="store_true",
                    help="archive-scale memory check: time and peak RSS of the command alone (the forward-only "
                         "comparison holds every lesion's input in memory)")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))

    from wbs_dist.synth import write_archive

    args.out.mkdir(parents=True, exist_ok=True)
    archive = args.out / f"archive-{args.studies}-{args.seed}"
    if not archive.exists():
        write_archive(archive, args.studies, seed=args.seed, form="dir")
    run = args.out / f"run-{args.model}-{height}x{width}-{args.folds}folds"
    make_run(run, args.model, height, width, args.folds)

    e2e = end_to_end(args, archive, run, args.out / "e2e" / "pred.csv")
    if args.end_to_end_only:
        return report_end_to_end(args, e2e, height, width)
    dec, results = decode_only(args, archive, height, width)
    fwd, fwd_scores = forward_only(args, run, results)

    # The same lesions got the same scores both ways (batches differ, so allow float noise).
    pred = list(csv.DictReader(open(args.out / "e2e" / "pred.csv")))
    e2e_scores = {(r["study_uid"], int(r["lesion_id"])): float(r["score"]) for r in pred}
    assert set(e2e_scores) == set(fwd_scores), "end to end and forward only scored different lesions"
    max_diff = max(abs(e2e_scores[k] - float(fwd_scores[k])) for k in e2e_scores)
    assert max_diff < 1e-3, f"scores differ by {max_diff}"

    n = dec["studies"]
    rows = {
        "end to end (wbs-dist score)": {"seconds": e2e["seconds"], "studies_per_s": n / e2e["seconds"]},
        "forward only (pre-decoded)": {"seconds": fwd["seconds"], "studies_per_s": n / fwd["seconds"]},
        f"decode only ({args.workers} process{'es' if args.workers > 1 else ''})":
            {"seconds": dec["seconds"], "studies_per_s": n / dec["seconds"]},
    }
    ratio = rows["end to end (wbs-dist score)"]["studies_per_s"] / rows["forward only (pre-decoded)"]["studies_per_s"]
    host = (f"{machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} inference thread(s)")
    print(f"\n# bench/score on {host}")
    print(f"# {n} studies, {fwd['lesions']} lesions, {args.model} {height}x{width}, {args.folds} fold models, "
          f"batch {args.batch}, {args.workers} decoding process(es)")
    print(f"{'':<34}{'seconds':>9}{'studies/s':>11}")
    for name, r in rows.items():
        print(f"{name:<34}{r['seconds']:>9.1f}{r['studies_per_s']:>11.3f}")
    print(f"end to end / forward only: {ratio:.3f} (target >= 0.9); max score difference {max_diff:.1e}")
    print(f"peak RSS: scorer process tree {e2e['tree_peak_rss_mb']:.0f} MB, largest process "
          f"{e2e['largest_process_peak_rss_mb']:.0f} MB")
    report = {"machine": host, "studies": n, "lesions": fwd["lesions"], "model": args.model,
              "input_size": [height, width], "folds": args.folds, "batch": args.batch, "workers": args.workers,
              "results": rows, "ratio_end_to_end_over_forward": ratio, "max_score_difference": max_diff,
              "peak_rss_mb": {"tree": e2e["tree_peak_rss_mb"], "largest_process": e2e["largest_process_peak_rss_mb"]}}
    path = args.out / f"score-{args.model}-{height}x{width}-{args.folds}folds-{n}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"# wrote {path}")


def report_end_to_end(args, e2e: dict, height: int, width: int) -> None:
    pred = args.out / "e2e" / "pred.csv"
    summary = pred.with_name("pred.summary.csv")
    with pred.open() as fh:
        lesions = sum(1 for _ in fh) - 1
    with summary.open() as fh:
        studies = sum(1 for _ in fh) - 1
    host = f"{machine()}, torch {torch.__version__}"
    print(f"\n# bench/score --end-to-end-only on {host}")
    print(f"# {studies} studies, {lesions} lesions, {args.model} {height}x{width}, {args.folds} fold models, "
          f"batch {args.batch}, {args.workers} decoding process(es)")
    print(f"end to end: {e2e['seconds']:.0f} s, {studies / e2e['seconds']:.2f} studies/s")
    print(f"peak RSS of the scorer's process tree: {e2e['tree_peak_rss_mb']:.0f} MB; by quarter of the run: "
          + ", ".join(f"{q:.0f}" for q in e2e["tree_peak_rss_mb_by_quarter"]) + " MB")
    report = {"machine": host, "studies": studies, "lesions": lesions, "model": args.model,
              "input_size": [height, width], "folds": args.folds, "batch": args.batch, "workers": args.workers,
              "seconds": e2e["seconds"], "studies_per_s": studies / e2e["seconds"],
              "peak_rss_mb": {"tree": e2e["tree_peak_rss_mb"], "tree_by_quarter": e2e["tree_peak_rss_mb_by_quarter"],
                              "largest_process": e2e["largest_process_peak_rss_mb"]}}
    path = args.out / f"score-e2e-{args.model}-{height}x{width}-{args.folds}folds-{studies}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
