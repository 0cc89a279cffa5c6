"""Cost per patient-step against the chunk size of a batched trial.

    python -m benchmarks.cohort_chunks [--shape 32] [--lesions 3] [--spacing-um 100]
        [--chunks 1 2 4 16 64] [--hours 24]
        [--out benchmarks/results/cohort-chunks-<shape>x<lesions>.json]

For each chunk size c, c patients of the melanoma-preset cohort of
:mod:`benchmarks.cohort_batch` (exactly ``--lesions`` lesions each, nivolumab)
run in one chunk of :func:`tmesolve.cohort.run_trial`: first a 2-hour trial
that compiles the loop for that batch shape, then, timed, a trial of a
1-day lead-in and ``--hours`` of therapy with the loop already compiled
(set-up, stepping and scoring; no compile: each patient's set-up and scoring
are a fixed cost per patient, the same at every chunk size, which ``--hours``
spreads over more steps). Reported per chunk size: wall and
CPU milliseconds per patient-step, and their ratio to the first chunk size
(the reference, in the same process), beside the chunk size
:func:`tmesolve.cohort.choose_chunk_size` picks on this machine for a group of
the largest size.

On a CPU a batch does the same arithmetic as its members one at a time; it
gains by sharing each kernel's fixed cost (small lesions) and loses once the
batch outgrows the caches (large ones). This is what ``CPU_CHUNK_STATE_BYTES``
and ``CPU_CHUNK_MIN`` in :mod:`tmesolve.cohort` rest on.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.cohort_batch import ARM, _cohort


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--spacing-um", type=float, default=100.0)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    parser.add_argument("--hours", type=float, default=24.0, help="timed therapy after a 1-day lead-in")
    parser.add_argument("--out", help="default benchmarks/results/cohort-chunks-<shape>x<lesions>.json")
    args = parser.parse_args(argv)
    if min(args.chunks) < 1 or len(set(args.chunks)) != len(args.chunks):
        raise SystemExit(f"--chunks: got {args.chunks}; expected distinct chunk sizes >= 1")
    if args.shape < 4 or not 1 <= args.lesions <= 5 or args.spacing_um <= 0:
        raise SystemExit(f"--shape/--lesions/--spacing-um: got {args.shape}/{args.lesions}/"
                         f"{args.spacing_um}; expected >= 4 voxels, 1-5 lesions, a spacing > 0")
    if args.hours <= 0:
        raise SystemExit(f"--hours: got {args.hours}; expected > 0")

    from benchmarks import write_json
    from benchmarks.machine import machine_info
    from tmesolve.cohort import choose_chunk_size, run_trial, state_nbytes
    from tmesolve.grid import Grid
    from tmesolve.model.tme_setup import setup_tme

    out = args.out or f"benchmarks/results/cohort-chunks-{args.shape}x{args.lesions}.json"

    grid = Grid((args.shape,) * 3, args.spacing_um)
    samples = _cohort(max(args.chunks), args.lesions, args.shape, args.spacing_um)
    first = samples[0]
    state_bytes = state_nbytes(setup_tme(grid, first.lesion_specs(), therapy=ARM, seed=first.seed).state)
    rows = []
    for chunk in args.chunks:
        members = list(samples[:chunk])
        integrators: dict = {}
        run_trial(members, [ARM], grid, duration_h=2.0, lead_in_h=1.0, chunk_size=chunk,
                  integrators=integrators)  # compiles the loop for this batch shape
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_trial(members, [ARM], grid, duration_h=args.hours, lead_in_h=24.0,
                           chunk_size=chunk, integrators=integrators)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps = sum(entry["steps"] for entry in result.chunks)
        rows.append({"chunk": chunk, "steps": steps, "wall_s": wall, "cpu_s": cpu,
                     "compiles": sum(result.trace_counts.values()),
                     "wall_ms_per_patient_step": 1e3 * wall / (steps * chunk),
                     "cpu_ms_per_patient_step": 1e3 * cpu / (steps * chunk)})
        print(f"chunk {chunk}: {rows[-1]['wall_ms_per_patient_step']:.3f} ms wall, "
              f"{rows[-1]['cpu_ms_per_patient_step']:.3f} ms CPU per patient-step", flush=True)
    reference = rows[0]
    for row in rows:
        row["wall_ratio_to_first"] = row["wall_ms_per_patient_step"] / reference["wall_ms_per_patient_step"]
        row["cpu_ratio_to_first"] = row["cpu_ms_per_patient_step"] / reference["cpu_ms_per_patient_step"]
    result = {
        "machine": machine_info(),
        "case": {"preset": "melanoma", "arm": ARM, "grid": [args.shape] * 3, "lesions": args.lesions,
                 "spacing_um": args.spacing_um, "timed_hours": args.hours + 24.0,
                 "state_bytes_per_patient": state_bytes},
        "automatic_chunk": choose_chunk_size(state_bytes, max(args.chunks)),
        "chunks": rows,
        "note": "ms per patient-step of a trial whose loop is already compiled; ratios to the first chunk size",
    }
    write_json(out, result)
    print(f"automatic chunk size here: {result['automatic_chunk']} -> {out}")
    return result


if __name__ == "__main__":
    main()
