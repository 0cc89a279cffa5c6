#!/usr/bin/env bash
# The GPU measurements of the performance issue, as one prepared script for a
# machine lent with a GPU for a few minutes. Run from the repository root:
#
#   OUT=/some/folder bash benchmarks/device_run.sh   # every part: limits add up to 8.5 minutes, 10 at worst
#   PARTS="pde50 tme" OUT=/some/folder bash benchmarks/device_run.sh
#
# Parts (each under its own time limit, so one that hangs cannot eat the rest):
#   pde50    bandwidth (JAX on the device) and the PDE part of a 50^3 lesion with
#            ten diffusing species (target: <= 0.1 ms per step)
#   tme      the full TME step at 1 x 128^3 and 1 x 256^3 and a batch of 64 lesions
#            at 32^3 (target: >= 50 % of the HBM roofline at 256^3)
#   largest  whether a 512^3 lesion runs (target: 512^3 on 80 GB; SIZES=384 tries another)
#   cohort   the batched cohort (16 patients x 3 lesions x 32^3, 16 days) against
#            one patient in its own process
#   tests    the verification and model tests on the device (float32 and float64; not the
#            19 s well-mixed run against solve_ivp, which needs only the CPU to check)
#   patterns (not run unless named in PARTS, 45 s) benchmarks.cpu_patterns on the device:
#            among others whether a stack's transforms run faster field by field there too
#            (tmesolve.spectral.transforms_field_by_field chooses that on CPUs only)
#   floor    (not run unless named in PARTS, 150 s) benchmarks.arithmetic_floor at 1 x 256^3: the
#            step's transcendentals at the device's exp rate against 50 % of the HBM roofline
#
# Needs JAX with its GPU plugin, numpy, h5py, PyYAML (the cohort presets) and
# pytest (the tests part replaces pyproject's addopts: one process, no
# pytest-xdist); the benchmarks and these tests do not import Hydra or
# lifelines, so on an image with those no wheels need to travel. JAX is told not to reserve
# most of the GPU's memory up front (XLA_PYTHON_CLIENT_PREALLOCATE=false): the
# largest-lesion and cohort parts start child processes that need it. Results: one JSON per part and
# log.txt in $OUT (default ./device-out). Each part's exit status is logged;
# the script goes on after a failed part and exits non-zero if any failed.
set -u
OUT=${OUT:-device-out}
PARTS=${PARTS:-"pde50 tme largest cohort tests"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON=${PYTHON:-python3}
failed=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log it
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (limit ${seconds} s): $*" | tee -a "$OUT/log.txt"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$seconds" "$@" >>"$OUT/log.txt" 2>&1
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
    [ "$status" -eq 0 ] || failed=1
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  timeout 60 "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1; } >>"$OUT/log.txt"

for name in $PARTS; do
    case $name in
        pde50)   part pde50 60 "$PYTHON" -m benchmarks --only bandwidth,pde50 --out "$OUT/pde50.json" ;;
        tme)     part tme 150 "$PYTHON" -m benchmarks --only bandwidth,tme --no-persistent-cache \
                     --tme-cases 128x1,256x1,32x64 --out "$OUT/tme.json" ;;
        largest) part largest 150 "$PYTHON" -m benchmarks.largest_lesion --sizes "${SIZES:-512}" \
                     --timeout-s 120 --out "$OUT/largest-lesion.json" ;;
        cohort)  part cohort 90 "$PYTHON" -m benchmarks.cohort_batch --patients 16 --days 16 \
                     --singles 1 --out "$OUT/cohort-batch.json" ;;
        tests)   part tests 60 "$PYTHON" -m pytest -q -x -p no:cacheprovider -o "addopts=-ra --import-mode=importlib" tests/verification \
                     tests/model/test_tme_local.py tests/model/test_oxygen.py -k "not well_mixed" ;;
        patterns) part patterns 45 "$PYTHON" -m benchmarks.cpu_patterns --out "$OUT/patterns.json" ;;
        floor)   part floor 150 "$PYTHON" -m benchmarks.arithmetic_floor --case 256x1 --out "$OUT/arithmetic-floor.json" ;;
        *)       echo "unknown part: $name (expected pde50, tme, largest, cohort, tests, patterns, floor)" | tee -a "$OUT/log.txt"
                 failed=1 ;;
    esac
done
tail -n 40 "$OUT/log.txt"
exit $failed
