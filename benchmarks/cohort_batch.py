"""Batched cohort against one patient per process: the throughput of ``run_trial``'s vmap.

    python -m benchmarks.cohort_batch [--patients 64] [--lesions 3] [--shape 32]
        [--spacing-um 100] [--days 365] [--singles 2] [--progress DIR]
        [--out benchmarks/results/cohort-batch.json]

A melanoma-preset cohort of ``--patients`` patients with exactly ``--lesions``
lesions each, one arm (nivolumab after a 2-week lead-in), ``--days`` in all.

* batched: :func:`tmesolve.cohort.run_trial` with every patient in one chunk
  (one compile, the patients advanced together by ``BatchIntegrator``), in
  this process; the wall time includes the compile.
* one at a time: ``--singles`` of the same patients, each in a fresh Python
  process (``--single INDEX``), the way a job array of single-patient runs
  would go: each pays interpreter start, imports, the setup, a compile and
  its run. Their mean wall time × patients is the one-at-a-time estimate.

The full case (64 patients × 3 lesions × 32³ × a year) takes hours on a
2-core CPU: ``--progress DIR`` keeps the batched run's checkpoints there
(:mod:`tmesolve.trial_progress`, every 30 minutes), and the same command
continues it after a stop. The batched time is then the sum over every
attempt of each chunk's wall time (compile included); ``attempts`` says how
many runs it took. CPU times (process user + system, all threads; the batched
run's from its checkpoints, the single runs' from their child processes) are
reported beside wall times: a long run on a shared machine has its wall time
inflated by whatever else ran, its CPU time much less so.

Figures: ``speedup`` = one-at-a-time estimate ÷ batched wall time (the issue
target is ≥ 10×), and patient-lesion-steps per second both ways. On a CPU the
batched loop does the same arithmetic as the separate runs, so its gain is the
compile and start-up paid once instead of per patient; on a GPU it is the
device filled by many small lesions at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import time

LEAD_IN_H = 14 * 24.0
ARM = "nivolumab"


def _cohort(patients: int, lesions: int, shape: int, spacing_um: float):
    from tmesolve.cohort import COHORT_PRESETS, sample_cohort

    box_radius_um = 0.5 * shape * spacing_um
    spec = dataclasses.replace(
        COHORT_PRESETS["melanoma"],
        n_patients=patients,
        lesions_min=lesions,
        lesions_max=lesions,
        radius_um_range=(0.3 * box_radius_um, 0.5 * box_radius_um),
    )
    return sample_cohort(spec)


def _run(samples, shape: int, spacing_um: float, days: float, progress: str | None = None) -> dict:
    from tmesolve.cohort import run_trial
    from tmesolve.grid import Grid

    start = time.perf_counter()
    result = run_trial(samples, [ARM], Grid((shape,) * 3, spacing_um),
                       duration_h=days * 24.0 - LEAD_IN_H, lead_in_h=LEAD_IN_H, chunk_size=len(samples),
                       progress_dir=progress, resume="auto")
    wall_s = time.perf_counter() - start
    if progress is not None:
        # Over every attempt: each chunk's wall time (setup, compile and run) as checkpointed.
        wall_s = sum(chunk["seconds"] for chunk in result.chunks)
    outcomes = result.outcomes[ARM]
    return {"wall_s": wall_s, "wall_s_this_process": time.perf_counter() - start,
            "cpu_s": sum(chunk["cpu_seconds"] for chunk in result.chunks),
            "attempts": max(chunk["attempts"] for chunk in result.chunks),
            "steps": sum(chunk["steps"] for chunk in result.chunks),
            "trace_counts": {str(k): v for k, v in result.trace_counts.items()},
            "best_response": [outcome.best_response for outcome in outcomes],
            # NaN (no measurable baseline) as null: the result file is strict JSON.
            "best_percent_change": [float(outcome.best_percent_change)
                                    if math.isfinite(outcome.best_percent_change) else None
                                    for outcome in outcomes]}


def _single(index: int, args) -> None:
    samples = _cohort(args.patients, args.lesions, args.shape, args.spacing_um)
    print(json.dumps(_run([samples[index]], args.shape, args.spacing_um, args.days)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--spacing-um", type=float, default=100.0)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--singles", type=int, default=2, help="patients run one per process")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--progress", help="folder for the batched run's checkpoints; rerun to continue")
    parser.add_argument("--out", default="benchmarks/results/cohort-batch.json")
    args = parser.parse_args(argv)
    if args.days * 24.0 <= LEAD_IN_H:
        raise SystemExit(f"--days: got {args.days}; expected more than the {LEAD_IN_H / 24:g}-day lead-in")
    if args.single is not None:
        _single(args.single, args)
        return {}

    import logging
    import os

    from benchmarks import write_json
    from benchmarks.machine import machine_info

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the chunk progress lines
    load_at_start = os.getloadavg()
    samples = _cohort(args.patients, args.lesions, args.shape, args.spacing_um)
    batched = _run(samples, args.shape, args.spacing_um, args.days, args.progress)
    print(f"batched: {args.patients} patients in {batched['wall_s']:.1f} s "
          f"({batched['attempts']} attempts)", flush=True)

    singles = []
    for index in range(min(args.singles, args.patients)):
        command = [sys.executable, "-m", "benchmarks.cohort_batch", "--single", str(index),
                   "--patients", str(args.patients), "--lesions", str(args.lesions),
                   "--shape", str(args.shape), "--spacing-um", str(args.spacing_um), "--days", str(args.days)]
        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        process_s = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        process_cpu_s = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        inner = json.loads(completed.stdout.strip().splitlines()[-1])
        singles.append({"index": index, "process_wall_s": process_s, "process_cpu_s": process_cpu_s, **inner})
        print(f"patient {index} alone: {process_s:.1f} s in its own process", flush=True)
        alone, together = inner["best_percent_change"][0], batched["best_percent_change"][index]
        if (alone is None) != (together is None) or (
                alone is not None and abs(alone - together) > 1e-3 * max(1.0, abs(together))):
            raise SystemExit(f"patient {index}: best change {alone} % alone but {together} % in the batch")

    mean_single_s = sum(s["process_wall_s"] for s in singles) / len(singles)
    one_at_a_time_s = mean_single_s * args.patients
    one_at_a_time_cpu_s = sum(s["process_cpu_s"] for s in singles) / len(singles) * args.patients
    result = {
        "machine": machine_info(),
        "cohort": {"preset": "melanoma", "patients": args.patients, "lesions": args.lesions,
                   "grid": [args.shape] * 3, "spacing_um": args.spacing_um, "days": args.days,
                   "arm": ARM, "lead_in_days": LEAD_IN_H / 24.0},
        "batched": batched,
        "singles": singles,
        "one_at_a_time_estimate_s": one_at_a_time_s,
        "speedup": one_at_a_time_s / batched["wall_s"],
        "one_at_a_time_estimate_cpu_s": one_at_a_time_cpu_s,
        # CPU time is not inflated by other work sharing the machine (wall time is).
        "speedup_cpu_time": one_at_a_time_cpu_s / batched["cpu_s"],
        "note": "one-at-a-time = mean wall time of the single-patient processes x patients",
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    write_json(args.out, result)
    print(f"one at a time (estimated from {len(singles)}): {one_at_a_time_s:.1f} s; batched "
          f"{batched['wall_s']:.1f} s; speedup {result['speedup']:.2f}x -> {args.out}")
    return result


if __name__ == "__main__":
    main()
