#!/usr/bin/env bash
# The property suite on the GPU under several Hypothesis seeds, one after another, each
# with every core (the suite is one pytest -n JOBS run per seed; the kernel tests at real
# sizes do not depend on the seed and are gpu-release.sh's job). Issue 21's "ten-seed run".
#
#   SEEDS="1 2 3" PROFILE=gpu LIMIT=540 OUT=gpu-out bash scripts/gpu-seeds.sh
#
# TESTS (default "properties") names what pytest runs: the release profile (400 examples a
# property, ten times the gpu profile's) may need more than one call's 600 s, and a part of
# the suite per call, e.g. TESTS="properties/test_gradients.py properties/test_parallax.py",
# then the rest with --deselect or the other files, keeps each call inside its limit.
#
# The first seed of a call runs the suite's kernel warm-up (lla_verify/testing/warmup.py);
# the later ones skip it (--lla-no-warmup), since the first left every configuration in
# Triton's cache, where the warm-up's 60 processes cost 27-32 s a seed for nothing
# (WARM_EACH=1 warms every seed).
#
# Stops starting seeds once fewer than PER_SEED seconds of LIMIT are left, so the call
# ends inside the scheduler's limit with every started seed finished. Per seed: the
# pytest log and its JUnit XML; OUT/seeds.txt has one line per seed (counts, wall, rc).
set -u
OUT=${OUT:-gpu-out}
PY=${PY:-python}
SEEDS=${SEEDS:-"1 2 3 4 5 6 7 8 9 10"}
PROFILE=${PROFILE:-gpu}
LIMIT=${LIMIT:-540}
PER_SEED=${PER_SEED:-150}
JOBS=${JOBS:-16}
TESTS=${TESTS:-properties}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
warm=""
for s in $SEEDS; do
    left=$(( LIMIT - ($(date +%s) - start) ))
    if [ "$left" -lt "$PER_SEED" ]; then echo "seed $s not started: ${left} s left" >> "$OUT/seeds.txt"; continue; fi
    t0=$(date +%s)
    timeout -s INT -k 20 "$(( left - 10 ))" $PY -m pytest -p no:cacheprovider -n "$JOBS" -q -rs --durations=10 $warm \
        --hypothesis-profile "$PROFILE" --hypothesis-seed="$s" --junitxml="$OUT/seed$s.xml" $TESTS \
        > "$OUT/seed$s.log" 2>&1
    rc=$?
    [ "${WARM_EACH:-0}" = 1 ] || warm="--lla-no-warmup"
    echo "seed $s profile $PROFILE rc=$rc wall=$(( $(date +%s) - t0 )) s: $(grep -E '^[0-9]+ (passed|failed)|[0-9]+ (passed|failed)' "$OUT/seed$s.log" | tail -1)" >> "$OUT/seeds.txt"
    grep -E "^FAILED|^lla-verify: " "$OUT/seed$s.log" >> "$OUT/seeds.txt"
done
cat "$OUT/seeds.txt"
