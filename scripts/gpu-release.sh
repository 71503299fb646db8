#!/usr/bin/env bash
# The GPU half of a release check, in one go on a CUDA machine with the project on
# PYTHONPATH: kernel tests at real sizes, the property suite (gpu profile), the CG study
# (--full) and the audit (--full) side by side, then optionally the benchmarks alone.
#
#   OUT=gpu-out LIMIT=480 BENCH=1 SLICES=10 bash scripts/gpu-release.sh
#
# ONLY (default "pytest,cg,audit") picks the jobs. "impl" (not in the default) runs the
# property suite, then the full audit, against IMPL (a built-in name or MODULE:CALLABLE;
# default flashlla when the public kernel imports, else the job is skipped), up to twice
# LIMIT; its JUnit XML and merged audit land under impl-* beside the others
# (scripts/gpu-flashlla.sh adds the check that the public kernel fails for its documented
# reasons). BASELINE (default the last full GPU audit that passed,
# baselines/audit-full-h200.json, "" for none) is the report.json the merged audit is compared with: a cell that grew
# past it fails the audit.
#
# PYTEST_ARGS are added to the pytest job's command (e.g. "--hypothesis-seed=1").
#
# Each job is stopped at LIMIT seconds: pytest with SIGINT (it prints its summary), the
# audit with SIGTERM (it writes a partial report marked INCOMPLETE). Everything lands in
# OUT/results.tgz (without cg_points.json, which cg_points.csv carries), with the logs
# and the audit's report.html beside it.
set -u
OUT=${OUT:-gpu-out}
LIMIT=${LIMIT:-480}
JOBS=${JOBS:-10}
SLICES=${SLICES:-13}
PY=${PY:-python}
ONLY=${ONLY:-pytest,cg,audit}
IMPL=${IMPL:-}
BASELINE=${BASELINE-baselines/audit-full-h200.json}
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT/work/audit-slices"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W="$OUT/work"
start=$(date +%s)
if want impl && [ -z "$IMPL" ] && $PY -c "import flashlla" 2>/dev/null; then IMPL=flashlla; fi
$PY -m lla_verify info > "$W/info.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$W/info.txt" 2>&1
if [ "${BENCH:-0}" = 1 ]; then  # timings first, alone on the GPU
    timeout 200 $PY -m lla_verify bench --out "$W/bench-fwd.md" --mem-seqs '' > "$W/bench.log" 2>&1
    timeout 200 $PY -m lla_verify bench-backward --out "$W/bench-bwd.md" >> "$W/bench.log" 2>&1
fi
want pytest && ( t0=$(date +%s); timeout -s INT -k 30 "$LIMIT" $PY -m pytest -p no:cacheprovider -n "$JOBS" -q --durations=15 \
    --hypothesis-profile gpu ${PYTEST_ARGS:-} tests/test_kernel_forward.py tests/test_kernel_backward.py \
    tests/test_kernel_launch.py tests/test_scale_zero.py tests/test_kernel_parallax.py tests/test_kernel_decode.py \
    tests/test_oracle_devices.py tests/test_bench.py::test_graphed_replays_the_plan_and_names_a_call_it_cannot_capture \
    properties > "$W/pytest.log" 2>&1; echo "rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$W/pytest.log" ) &
want cg && ( t0=$(date +%s); timeout -k 30 "$LIMIT" $PY -m lla_verify cg --full --no-progress --out "$W/cg-full" > "$W/cg.log" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$W/cg.log" ) &
# the audit as SLICES slices of its plan side by side (one process takes ~18 min on an
# H200, past a 10-minute scheduler limit; ten slices of the 145 LLA cells took 377 s; the
# other operators' 38 cells are what the three more slices are for), merged into one report after
want audit && ( t0=$(date +%s)
  # every operator's cells (lla_verify/registry/operators.py), each on its default implementation
  n=$($PY -c "from lla_verify.audit.plan import plan_op; from lla_verify.registry.operators import OPERATORS as O; print(sum(len(plan_op(k, O[k].resolve(O[k].default_impl), full=True)[0]) for k in O))")
  step=$(( (n + SLICES - 1) / SLICES ))
  for a in $(seq 0 "$step" $(( n - 1 ))); do
    ( OMP_NUM_THREADS=1 timeout -k 30 "$LIMIT" $PY -m lla_verify audit --full --device cuda --no-progress \
        --cells "$a:$(( a + step ))" --out "$W/audit-slices/s$a" > "$W/audit-slices/s$a.log" 2>&1 ) &
  done; wait
  $PY -m lla_verify audit --merge "$W"/audit-slices/s*/report.json ${BASELINE:+--baseline "$BASELINE"} \
      --out "$W/audit-full" > "$W/audit.log" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$W/audit.log" ) &
# the suite and the audit against IMPL, in their own folders (impl-*)
if want impl && [ -z "$IMPL" ]; then
    echo "impl job skipped: IMPL unset and flashlla does not import" >> "$W/info.txt"
elif want impl; then ( t0=$(date +%s); mkdir -p "$W/impl-audit-slices"
  timeout -s INT -k 30 "$LIMIT" $PY -m pytest -p no:cacheprovider -n "$JOBS" -q -rs --hypothesis-profile gpu \
      --lla-impl "$IMPL" --lla-device cuda --junitxml="$W/impl-pytest-junit.xml" properties > "$W/impl-pytest.log" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - t0 )) s impl=$IMPL" >> "$W/impl-pytest.log"
  n=$($PY -c "import sys; from lla_verify.audit.plan import plan; from lla_verify.registry.impls import get_impl; print(len(plan(get_impl(sys.argv[1]), full=True)[0]))" "$IMPL")
  step=$(( (n + SLICES - 1) / SLICES ))
  for a in $(seq 0 "$step" $(( n - 1 ))); do
    ( OMP_NUM_THREADS=1 timeout -k 30 "$LIMIT" $PY -m lla_verify audit --full --ops lla --impl "$IMPL" --device cuda --no-progress \
        --cells "$a:$(( a + step ))" --out "$W/impl-audit-slices/s$a" > "$W/impl-audit-slices/s$a.log" 2>&1 ) &
  done; wait
  $PY -m lla_verify audit --merge "$W"/impl-audit-slices/s*/report.json --out "$W/impl-audit-full" > "$W/impl-audit.log" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - t0 )) s impl=$IMPL" >> "$W/impl-audit.log" ) &
fi
wait
echo "gpu-release: $(( $(date +%s) - start )) s" >> "$W/info.txt"
# cg_points.json (74 MB at --full) repeats cg_points.csv with the residual histories:
# left out of the archive, which has to stay small enough to copy off a lent machine
# (16 MiB a file there: the first run lost every report to a 25 MB archive)
tar czf "$OUT/results.tgz" -C "$W" --exclude=cg_points.json .
cp "$W/pytest.log" "$W/audit.log" "$W/cg.log" "$W/info.txt" "$OUT/" 2>/dev/null
cp "$W/impl-pytest.log" "$W/impl-audit.log" "$OUT/" 2>/dev/null
cp "$W/audit-full/report.html" "$OUT/audit-report.html" 2>/dev/null
rm -rf "$W"
ls -la "$OUT"
