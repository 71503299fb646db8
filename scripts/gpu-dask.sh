#!/usr/bin/env bash
# Issue 24: the audit on Dask with one GPU worker against the one-process run of the same
# plan, on a CUDA machine, both timed; then the two reports compared cell for cell.
#
#   WHEELS=gpu-local/wheels OUT=gpu-out MODE=--quick CELLS=0:40 LIMIT=240 bash scripts/gpu-dask.sh
#   DEVICE=cpu TRITON_INTERPRET=1 CELLS=0:3 OUT=/tmp/d bash scripts/gpu-dask.sh     # the same on CPU
#
# The GPU image lacks dask and distributed: WHEELS is a folder of wheels for them and their
# pure-Python dependencies (`pip download -d DIR --python-version 3.12 --platform
# manylinux2014_x86_64 --platform any --only-binary=:all: dask distributed` on any machine),
# installed with --no-index when `import distributed` fails. MODE is --quick or --full;
# CELLS an optional --cells slice; each run is stopped at LIMIT seconds (a partial report).
# OUT/dask-compare.txt: the walls, the cells whose verdicts differ and by how much (the
# worker's thread count may move the last bits of some reductions; an exact match is
# tests/test_audit_dask.py's job, on CPU with matched threads).
set -u
OUT=${OUT:-gpu-out}
PY=${PY:-python}
MODE=${MODE:---quick}
CELLS=${CELLS:-}
LIMIT=${LIMIT:-240}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import distributed" 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links "${WHEELS:?no distributed here: set WHEELS}" dask distributed \
        > "$OUT/dask-install.log" 2>&1 || { echo "installing dask failed: $OUT/dask-install.log"; exit 2; }
fi
slice=()
[ -n "$CELLS" ] && slice=(--cells "$CELLS")
for how in one dask; do
    extra=()
    [ "$how" = dask ] && extra=(--dask)
    t0=$(date +%s)
    timeout -k 30 "$LIMIT" $PY -m lla_verify audit "$MODE" --device "$DEVICE" --no-progress "${slice[@]}" "${extra[@]}" \
        --out "$OUT/audit-$how" > "$OUT/audit-$how.log" 2>&1
    echo "$how: rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$OUT/dask-compare.txt"
done
$PY - "$OUT" >> "$OUT/dask-compare.txt" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path
from lla_verify.audit.on_dask import comparable
out = Path(sys.argv[1])
a, b = (comparable(json.loads((out / f"audit-{h}" / "report.json").read_text())) for h in ("one", "dask"))
same = sum(x == y for x, y in zip(a["cells"], b["cells"]))
print(f"cells: one-process {len(a['cells'])}, dask {len(b['cells'])}; identical {same}")
for x, y in zip(a["cells"], b["cells"]):
    if x != y:
        rx, ry = x.get("ratio"), y.get("ratio")
        rel = abs(rx - ry) / max(abs(rx), 1e-300) if isinstance(rx, float) and isinstance(ry, float) else None
        print(f"  differs: {x.get('spec')}: ratio {rx} vs {ry}" + (f" (relative {rel:.1e})" if rel is not None else ""))
PYEOF
cat "$OUT/dask-compare.txt"
