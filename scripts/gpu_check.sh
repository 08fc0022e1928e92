#!/usr/bin/env bash
# The device check: on a bare GPU machine, the GPU tests (tests/test_gpu.py) and the GPU rows of
# scripts/benchmark.py, in at most 8 minutes, with no installs and no network. The project is put
# on the path (PYTHONPATH=repo root), not installed.
#
#   bash scripts/gpu_check.sh                 # logs and benchmark.json in a new temporary folder
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# On a machine without CUDA it runs too: every GPU test says it is skipped and why, and the benchmark
# is skipped, so CI exercises this script. Exit status: non-zero if any test or the benchmark failed
# (or ran past its time limit). Settings: PYTHON (default python3), GPU_CHECK_TEST_SECONDS (330),
# GPU_CHECK_BENCH_SECONDS (130).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
PYTHON=${PYTHON:-python3}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-330}
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-130}
mkdir -p "$OUT"
cd "$REPO" || exit 2
# `accelerate launch` workers inherit this, and scripts/train.py puts the repository first anyway.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

echo "== gpu_check: logs and results in $OUT"
# One interpreter start for the versions, the GPUs (environment.txt) and their count (stdout).
gpus=$("$PYTHON" - "$OUT/environment.txt" <<'EOF'
import platform, sys, torch, accelerate
lines = [f"python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}"]
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
for i in range(count):
    p = torch.cuda.get_device_properties(i)
    lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
lines += [] if count else ["no CUDA GPU"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines), file=sys.stderr)
print(count)
EOF
) || { echo "gpu_check: FAILED: python, torch or accelerate missing"; exit 2; }

# With a GPU and pytest-xdist (the GPU machines have it), 4 test processes share the GPU: most of the
# tests' time is process start-up and compilation on the CPU, which has cores to spare.
parallel=()
if [ "$gpus" -gt 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    parallel=(-n 4)
fi
echo "== GPU tests (limit ${TEST_SECONDS}s)"
timeout "$TEST_SECONDS" "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py \
    --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
status=$?
[ "$status" -eq 0 ] || failed+=("GPU tests (exit $status$([ "$status" -eq 124 ] && echo ', time limit'))")

if [ "$gpus" -gt 0 ]; then
    echo "== benchmark, GPU rows (limit ${BENCH_SECONDS}s)"
    timeout "$BENCH_SECONDS" "$PYTHON" scripts/benchmark.py --devices cuda --parts loops,ddp,startup \
        --repeats 5 --startup-repeats 1 --output "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log"
    status=$?
    [ "$status" -eq 0 ] || failed+=("benchmark (exit $status$([ "$status" -eq 124 ] && echo ', time limit'))")
else
    echo "== benchmark, GPU rows: skipped (no CUDA GPU)" | tee "$OUT/benchmark.log"
fi

echo "== summary"
"$PYTHON" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
if (out / "gpu_tests.xml").exists():
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    print(f"GPU tests: {passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped")
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            found = case.find(outcome)
            if found is not None:
                print(f"  {outcome}: {case.get('name')}: {(found.get('message') or '').splitlines()[0][:150]}")
else:
    print("GPU tests: no report (stopped before the end)")
bench = out / "benchmark.json"
if bench.exists():
    result = json.loads(bench.read_text())
    print("GPU:", result["machine"].get("gpu"))
    table = result["table"].splitlines()
    print("\n".join(line for line in table if line.startswith(("book MLP", "matmul peak", "  cuda"))))
EOF
if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: OK (logs in $OUT)"
