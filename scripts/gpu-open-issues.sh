#!/usr/bin/env bash
# The GPU runs issues 22 (Parallax) and 23 (decode) wait on, as three device calls of under
# ten minutes each, from the repository root on a CUDA machine:
#
#   OUT=$OUT bash scripts/gpu-open-issues.sh tests     # the kernels' tests and properties at real sizes
#   OUT=$OUT bash scripts/gpu-open-issues.sh timings   # the tables of record and the A/B runs, alone on the GPU
#   OUT=$OUT bash scripts/gpu-open-issues.sh sweeps    # parallax_decode's layout sweep (scripts/decode_sweeps.sh)
#
# OLD is a copy of the parallax_triton package to time the current one against (default
# gpu-local/px_old/kernels/parallax_triton, the package before its inference kernel). Make it
# here and carry gpu-local (ignored through .git/info/exclude):
#
#   mkdir -p gpu-local/px_old && git archive d2ce810 kernels/parallax_triton | tar -x -C gpu-local/px_old
#
# Each step has its own timeout (pytest is stopped with SIGINT, so it prints its summary);
# the logs and tables land in OUT/work and, packed, in OUT/<part>.tgz, with the main table
# of each part beside it (the device tool brings back at most 8 files from OUT).
#
# The property suite runs without --lla-no-warmup: the plugin compiles every (dtype, D) of
# the packages under test once, side by side, before the workers start; with the flag each
# worker compiles the fp32 kernels (about 50 s each) itself.
set -u
part=${1:?usage: gpu-open-issues.sh tests|timings|sweeps}
OUT=${OUT:?set OUT to the folder that comes back}
OLD=${OLD:-gpu-local/px_old/kernels/parallax_triton}
JOBS=${JOBS:-16}
PY=${PY:-python}
W="$OUT/work"
mkdir -p "$W"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to W/NAME.log
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    timeout -s INT -k 20 "$limit" "$@" > "$W/$name.log" 2>&1
    echo "rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$W/$name.log"
    tail -n 3 "$W/$name.log"
}
$PY -m lla_verify info > "$W/info.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$W/info.txt" 2>&1

case "$part" in
tests)
    # timeout runs a program, not a shell function: the command is spelled out each time
    pt="$PY -m pytest -p no:cacheprovider -n $JOBS -q --durations=10 --hypothesis-profile gpu"
    step pytest-kernels 230 $pt tests/test_kernel_parallax.py tests/test_kernel_decode.py tests/test_warmup.py
    step props-parallax 150 $pt properties/test_parallax.py --lla-parallax-impl parallax-triton
    step props-parallax-bf16w 150 $pt properties/test_parallax.py --lla-parallax-impl parallax-triton-bf16w
    ;;
timings)
    if [ ! -d "$OLD" ]; then echo "OLD=$OLD is not a directory (see the header)"; exit 2; fi
    step ab-infer 110 $PY scripts/ab_parallax.py --old "$OLD" --rounds 3 --out "$W/ab-infer.md"
    step ab-we1 110 $PY scripts/ab_parallax.py --old kernels/parallax_triton --set INFER_WE_PARTS=1 --rounds 3 \
        --out "$W/ab-we1.md"
    step prof-parallax 60 $PY scripts/profile_parallax.py --step --out "$W/prof-parallax.md"
    step bench-decode 200 $PY -m lla_verify bench-decode --graphs --no-progress --oracle-max-cache 32768 \
        --out "$W/bench-decode.md"
    step prof-keyed 60 $PY scripts/profile_decode_kernels.py --graphs --op lla --solver keyed --calls 3 \
        --shapes 64:131072:64,16:131072:64,64:32768:64 \
        --variant "p4-b32:lla_decode.keyed.KEY_PRODUCT_RESIDENT_PER_SM={16:8,32:8,64:4,128:8};lla_decode.keyed.KEY_PASS_BLOCK_N=32"
    ;;
sweeps)
    bash scripts/decode_sweeps.sh "$W" parallax
    ;;
*)
    echo "unknown part $part: expected tests, timings or sweeps"; exit 2 ;;
esac

echo "$part: $(( $(date +%s) - start )) s" | tee -a "$W/info.txt"
tar -czf "$OUT/$part.tgz" -C "$OUT" work
for f in "$W"/*.md "$W/info.txt"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
ls "$OUT"
