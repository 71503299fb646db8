#!/usr/bin/env bash
# The decode kernels' layout sweeps, each variant's per-kernel device time beside SDPA's in one
# run (scripts/profile_decode_kernels.py --variant), on a CUDA machine from the repository root:
#
#     bash scripts/decode_sweeps.sh OUTDIR [sigma] [keyed] [parallax] [passes]
#
# (sigma, keyed and parallax by default; each takes a few minutes, so one GPU call may take one or two)
# What each sweep asks is in docs/decode.md ("Open"); `scripts/decode_kernel_stats.py` gives the
# same variants' registers and spills without a GPU. A sweep chooses defaults; the table of
# record is then `lla-verify bench-decode --graphs` (docs/performance.md).
set -u
out=${1:?usage: decode_sweeps.sh OUTDIR [sigma] [keyed] [parallax] [passes]}
shift
sweeps=${*:-sigma keyed parallax}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
prof="python scripts/profile_decode_kernels.py --graphs"
L=lla_decode
K=lla_decode.keyed
P=parallax_decode
all() { echo "{16:$1,32:$1,64:$1,128:$1}"; }

# lla_decode, Sigma solve: the output pass on a split of its own, the Sigma pass's split floor,
# and the solve's rows and warps at D = 128
sigma() {
timeout -s INT 280 $prof --op lla --solver sigma --calls 3 \
  --shapes 1:4096:128,16:4096:128,64:4096:128,1:32768:128,64:131072:128,64:131072:64,1:4096:64 \
  --variant "out-r8-b16w1:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1" \
  --variant "out-r4-b32w2:$L.OUT_RESIDENT_PER_SM=$(all 4);$L.OUT_BLOCK_N=32;$L.OUT_WARPS=2" \
  --variant "out-r3:$L.OUT_RESIDENT_PER_SM=$(all 3)" \
  --variant "minsplit1:$L.MIN_SPLIT_PER_DIM=1" \
  --variant "minsplit2:$L.MIN_SPLIT_PER_DIM=2" \
  --variant "solve-rows32w8:$L.SOLVE_ROWS={16:16,32:32,64:64,128:32};$L.SOLVE_WARPS={16:4,32:4,64:4,128:8}" \
  --variant "solve-held-w16:$L.SOLVE_ROWS={16:16,32:32,64:64,128:128};$L.SOLVE_WARPS={16:4,32:4,64:4,128:16}" \
  --variant "combo:$L.MIN_SPLIT_PER_DIM=2;$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$L.SOLVE_ROWS={16:16,32:32,64:64,128:32};$L.SOLVE_WARPS={16:4,32:4,64:4,128:8}" \
  > "$out/sweep-lla-sigma.txt" 2>&1; echo "rc=$?" >> "$out/sweep-lla-sigma.txt"
}

# lla_decode, keyed solve: the key passes' tile, warps and accumulator, and the split's programs
# (its graph is the plan's fixed schedule; "cap8" asks what fewer empty launches save)
keyed() {
timeout -s INT 280 $prof --op lla --solver keyed --calls 3 \
  --shapes 64:131072:128,64:131072:64,16:32768:128,1:4096:128 \
  --variant "acc64:$K.KEY_PASS_ACC2D=True" \
  --variant "b16w4acc:$K.KEY_PASS_BLOCK_N=16;$K.KEY_PASS_ACC2D=True" \
  --variant "b32w4acc:$K.KEY_PASS_BLOCK_N=32;$K.KEY_PASS_ACC2D=True" \
  --variant "b32w8acc:$K.KEY_PASS_BLOCK_N=32;$K.KEY_PASS_WARPS=8;$K.KEY_PASS_ACC2D=True" \
  --variant "b64w8:$K.KEY_PASS_WARPS=8" \
  --variant "b16w2-r8:$K.KEY_PASS_BLOCK_N=16;$K.KEY_PASS_WARPS=2;$L.RESIDENT_PER_SM=$(all 8)" \
  --variant "b16w4acc-r8:$K.KEY_PASS_BLOCK_N=16;$K.KEY_PASS_ACC2D=True;$L.RESIDENT_PER_SM=$(all 8)" \
  --variant "b32w4acc-r4-s4:$K.KEY_PASS_BLOCK_N=32;$K.KEY_PASS_ACC2D=True;$K.KEY_PASS_STAGES=4;$L.RESIDENT_PER_SM=$(all 4)" \
  --variant "cap8:$K.KEYED_MAX_ITERS=8" \
  > "$out/sweep-lla-keyed.txt" 2>&1; echo "rc=$?" >> "$out/sweep-lla-keyed.txt"
}

# parallax_decode: at D = 64, where large caches miss 1.2x, programs an SM, tile, stages, warps;
# at small caches, where two or three dependent launches miss it, the fused combine
parallax() {
timeout -s INT 280 $prof --op parallax --calls 5 \
  --shapes 64:131072:64,16:131072:64,64:32768:64,16:32768:64,16:4096:64,1:4096:64,1:32768:64,1:4096:128,16:4096:128,64:131072:128 \
  --variant "r16:$P.RESIDENT_PER_SM={16:16,32:16,64:16,128:8}" \
  --variant "r12:$P.RESIDENT_PER_SM={16:12,32:12,64:12,128:8}" \
  --variant "bn32:$P.BLOCK_N=32" \
  --variant "bn32-s4:$P.BLOCK_N=32;$P.SPLIT_STAGES=4" \
  --variant "bn32-w2:$P.BLOCK_N=32;$P.SPLIT_WARPS=2" \
  --variant "s4:$P.SPLIT_STAGES=4" \
  --variant "s5-r16:$P.SPLIT_STAGES=5;$P.RESIDENT_PER_SM={16:16,32:16,64:16,128:8}" \
  --variant "fused64:$P.FUSED_MAX_SPLITS=64" \
  --variant "fused64-c16:$P.FUSED_MAX_SPLITS=64;$P.FUSED_CHUNK=16" \
  --variant "fused-all:$P.FUSED_MAX_SPLITS=100000" \
  > "$out/sweep-parallax.txt" 2>&1; echo "rc=$?" >> "$out/sweep-parallax.txt"
}

# lla_decode's memory-bound passes on splits of their own (lla_decode.pass_split, at most
# PASS_MAX_SPLITS a head): the output pass (both solves), and the keyed solve's product and
# statistics passes, each with the narrow tiles and many programs an SM that Parallax's split
# kernel runs best with
passes() {
timeout -s INT 140 $prof --op lla --solver sigma --calls 3 \
  --shapes 1:4096:128,16:4096:128,64:4096:128,1:32768:128,16:32768:128,64:131072:128,64:131072:64,1:4096:64 \
  --variant "out-r8-b16w1:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1" \
  --variant "out-r8-b32w2:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=32;$L.OUT_WARPS=2" \
  --variant "out-r16-b16w1:$L.OUT_RESIDENT_PER_SM=$(all 16);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1" \
  > "$out/sweep-lla-passes-sigma.txt" 2>&1; echo "rc=$?" >> "$out/sweep-lla-passes-sigma.txt"
timeout -s INT 200 $prof --op lla --solver keyed --calls 3 \
  --shapes 64:131072:128,64:131072:64,16:131072:128,16:32768:128,1:32768:128,1:4096:128 \
  --variant "out8:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1" \
  --variant "prod-r8-b16:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$K.KEY_PRODUCT_RESIDENT_PER_SM=$(all 8);$K.KEY_PASS_BLOCK_N=16;$K.KEY_STATS_BLOCK_N=64" \
  --variant "prod-r4-b32:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$K.KEY_PRODUCT_RESIDENT_PER_SM=$(all 4);$K.KEY_PASS_BLOCK_N=32;$K.KEY_STATS_BLOCK_N=64" \
  --variant "stats-r8-b16w1:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$K.KEY_STATS_RESIDENT_PER_SM=$(all 8);$K.KEY_STATS_BLOCK_N=16;$K.KEY_STATS_WARPS=1" \
  --variant "both:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$K.KEY_PRODUCT_RESIDENT_PER_SM=$(all 8);$K.KEY_PASS_BLOCK_N=16;$K.KEY_STATS_RESIDENT_PER_SM=$(all 8);$K.KEY_STATS_BLOCK_N=16;$K.KEY_STATS_WARPS=1" \
  --variant "both-p4:$L.OUT_RESIDENT_PER_SM=$(all 8);$L.OUT_BLOCK_N=16;$L.OUT_WARPS=1;$K.KEY_PRODUCT_RESIDENT_PER_SM=$(all 4);$K.KEY_PASS_BLOCK_N=32;$K.KEY_STATS_RESIDENT_PER_SM=$(all 8);$K.KEY_STATS_BLOCK_N=16;$K.KEY_STATS_WARPS=1" \
  > "$out/sweep-lla-passes-keyed.txt" 2>&1; echo "rc=$?" >> "$out/sweep-lla-passes-keyed.txt"
}

for sweep in $sweeps; do
  case $sweep in
    sigma|keyed|parallax|passes) $sweep ;;
    *) echo "decode_sweeps.sh: unknown sweep $sweep (sigma, keyed, parallax, passes)" >&2; exit 2 ;;
  esac
done
