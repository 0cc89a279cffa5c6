"""Run the benchmark suite and write one JSON file.

    python -m benchmarks            # bandwidth, DD3 (N = 64, 128), PDE50, TME (1×32³, 1×64³, 3×32³)
    python -m benchmarks --quick    # tiny sizes: a smoke run of every code path
    python -m benchmarks --full     # adds DD3 N = 256 and TME 1×128³, 3×64³
    python -m benchmarks --only dd3 --only bandwidth --out benchmarks/results/mine.json
    python -m benchmarks --only tme --tme-cases 128x1,256x1,32x64   # chosen TME cases (N x lesions)

The default output is ``benchmarks/results/<backend>-<hostname>.json``
(``-quick`` appended for ``--quick``). The default suite takes about 6–8
minutes on a 2-core CPU VM; ``--full`` can take much longer there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("bandwidth", "dd3", "pde50", "tme")
RESULTS = Path(__file__).resolve().parent / "results"


def _sections(only: list[str] | None) -> tuple[str, ...]:
    if not only:
        return SECTIONS
    chosen = {name.strip() for item in only for name in item.split(",") if name.strip()}
    unknown = chosen - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: got {sorted(unknown)}; expected some of {', '.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in chosen)


def _tme_cases(text: str) -> tuple[tuple[int, int], ...]:
    """"128x1,32x3" -> ((128, 1), (32, 3)); argparse turns the ValueError into one line."""
    cases = []
    for item in text.split(","):
        size, _, lesions = item.strip().lower().partition("x")
        if not (size.isdigit() and lesions.isdigit() and int(size) >= 4 and int(lesions) >= 1):
            raise argparse.ArgumentTypeError(f"got {item!r}; expected N x lesions such as 128x1 (N >= 4)")
        cases.append((int(size), int(lesions)))
    return tuple(cases)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="tiny sizes (smoke test, figures meaningless)"
    )
    size.add_argument(
        "--full", action="store_true", help="add DD3 N=256 and TME 1x128^3, 3x64^3 (slow on CPUs)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="SECTION",
        help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON file to write (default: benchmarks/results/...)"
    )
    parser.add_argument(
        "--tme-cases",
        type=_tme_cases,
        metavar="NxL,...",
        help="TME cases as voxels-per-side x lesions, e.g. 128x1,256x1 (replaces the mode's cases)",
    )
    parser.add_argument(
        "--no-persistent-cache",
        action="store_true",
        help="do not measure the compile time with JAX's persistent compilation cache",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    sections = _sections(arguments.only)
    measure_cache = "tme" in sections and not arguments.quick and not arguments.no_persistent_cache
    cache_directory = (
        tempfile.TemporaryDirectory(prefix="tmesolve-bench-cache-") if measure_cache else None
    )

    import jax

    if cache_directory is not None:
        # A fresh, empty cache, set before the first compilation (JAX reads the
        # setting once): the first compile of a chunk is cold, a recompile after
        # jax.clear_caches() reads it back from disk. Every compile of the run
        # also writes its entry, which adds a little to the other compile times.
        jax.config.update("jax_compilation_cache_dir", cache_directory.name)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    from benchmarks import bandwidth, dd3, pde50, rounded, tme_step, write_json
    from benchmarks.machine import hostname, load_average, machine_info

    mode = "quick" if arguments.quick else "full" if arguments.full else "default"
    report: dict = {
        "schema": "tmesolve-benchmarks/1",
        "mode": mode,
        "sections": list(sections),
        "machine": machine_info(),
        "persistent_cache_measured": cache_directory is not None,
    }
    seconds = {}
    started = time.perf_counter()
    bandwidth_result = None
    if "bandwidth" in sections:
        start = time.perf_counter()
        bandwidth_result = bandwidth.measure_bandwidth(
            **({"array_MiB": 8, "repeats": 3} if arguments.quick else {})
        )
        report["bandwidth"] = bandwidth_result
        seconds["bandwidth"] = time.perf_counter() - start
    if "dd3" in sections:
        start = time.perf_counter()
        if arguments.quick:
            options = {"sizes": (16,), "repeats": 1, "accuracy_size": 16}
        elif arguments.full:
            options = {"sizes": (64, 128, 256), "repeats": 2}
        else:
            options = {"sizes": (64, 128), "repeats": 2}
        report["dd3"] = dd3.measure_dd3(bandwidth=bandwidth_result, **options)
        seconds["dd3"] = time.perf_counter() - start
    if "pde50" in sections:
        start = time.perf_counter()
        options = {"size": 8, "repeats": 1} if arguments.quick else {"repeats": 3}
        report["pde50"] = pde50.measure_pde50(**options)
        seconds["pde50"] = time.perf_counter() - start
    if "tme" in sections:
        start = time.perf_counter()
        if arguments.quick:
            options = {
                "cases": ((16, 1),),
                "repeats": 1,
                "target_call_s": 0.1,
                "max_steps_per_call": 3,
                "substeps_for_first_case": False,
            }
        elif arguments.full:
            options = {"cases": ((32, 1), (64, 1), (128, 1), (32, 3), (64, 3)), "repeats": 2}
        else:
            options = {"cases": ((32, 1), (64, 1), (32, 3))}
        if arguments.tme_cases:
            options["cases"] = arguments.tme_cases
        report["tme"] = tme_step.measure_tme(
            bandwidth=bandwidth_result, persistent_cache=measure_cache, **options
        )
        seconds["tme"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    report["section_wall_s"] = seconds
    report["load_average_at_end"] = load_average()
    report = rounded(report, 5)

    if cache_directory is not None:
        cache_directory.cleanup()
    suffix = "-quick" if arguments.quick else "-full" if arguments.full else ""
    out = arguments.out or RESULTS / f"{report['machine']['backend']}-{hostname()}{suffix}.json"
    write_json(out, report)

    machine = report["machine"]
    lines = [
        f"tmesolve benchmarks ({mode}) on {machine['hostname']}: {machine['cpu_model']}, "
        f"{machine['cpu_cores_usable']} cores, "
        f"backend {machine['backend']} ({machine['device_kind']}), "
        f"jax {machine['versions']['jax']}, commit {str(machine['git_commit'])[:12]}"
        f"{' (dirty tree)' if machine['git_dirty'] else ''}",
        f"load average at start {machine['load_average_at_start']}, "
        f"at end {report['load_average_at_end']}",
    ]
    for name, module in (("bandwidth", bandwidth), ("dd3", dd3), ("pde50", pde50), ("tme", tme_step)):
        if name in report:
            lines += [""] + module.table(report[name])
    lines += [
        "",
        "wall time per section (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()),
        f"written: {out}",
    ]
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
