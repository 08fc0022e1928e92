#!/usr/bin/env bash
# The device check: on a bare GPU machine, the GPU tests (tests/test_gpu.py), the GPU rows of
# scripts/benchmark.py and the single-GPU record row (scripts/gpu_record.py: GPT-2 124M trained by
# scripts/train.py on memory-mapped shards), in at most 11 minutes, with no installs and no network. The project is put
# on the path (PYTHONPATH=repo root), not installed.
#
#   bash scripts/gpu_check.sh                 # logs and benchmark.json in a new temporary folder
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# On a machine without CUDA it runs too: every GPU test says it is skipped and why, and the benchmark
# is skipped, so CI exercises this script. Exit status: non-zero if any test or the benchmark failed
# (or ran past its time limit). Settings: PYTHON (default python3), GPU_CHECK_TEST_SECONDS (180),
# GPU_CHECK_BENCH_SECONDS (170, the MLP rows), GPU_CHECK_GPT_SECONDS (130, the GPT rows: GPT-124M, compiled),
# GPU_CHECK_RECORD_SECONDS (180, the record row), GPU_CHECK_RECORD_STEPS (150) and GPU_CHECK_RECORD_BATCH (32).
# Each step writes what it has measured so far, so a step stopped at its limit still leaves its figures.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
PYTHON=${PYTHON:-python3}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-180}
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-170}
GPT_SECONDS=${GPU_CHECK_GPT_SECONDS:-130}
RECORD_SECONDS=${GPU_CHECK_RECORD_SECONDS:-180}
RECORD_STEPS=${GPU_CHECK_RECORD_STEPS:-150}
RECORD_BATCH=${GPU_CHECK_RECORD_BATCH:-32}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the steps below run from the repository
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
# -k: a test run catches SIGTERM to checkpoint, so a step past its limit is killed 15 s later.
limited() { timeout -k 15 "$@"; }
outcome() { [ "$1" -eq 0 ] || failed+=("$2 (exit $1$([ "$1" -eq 124 ] || [ "$1" -eq 137 ] && echo ', time limit'))"); }

# The GPU tests, and the GPT's (test_gpt.py's GPU tests: bf16, the padded vocabulary).
echo "== GPU tests (limit ${TEST_SECONDS}s)"
limited "$TEST_SECONDS" "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py \
    tests/test_gpt.py -k gpu --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
outcome $? "GPU tests"

if [ "$gpus" -gt 0 ]; then
    echo "== benchmark, GPU rows (limit ${BENCH_SECONDS}s)"
    limited "$BENCH_SECONDS" "$PYTHON" scripts/benchmark.py --devices cuda --parts loops,ddp,startup \
        --samples 32768 --repeats 3 --startup-repeats 1 --output "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log"
    outcome $? "benchmark"
    echo "== benchmark, GPT rows (limit ${GPT_SECONDS}s)"
    limited "$GPT_SECONDS" "$PYTHON" scripts/benchmark.py --devices cuda --parts gpt --gpt-steps 4 --gpt-repeats 2 \
        --output "$OUT/benchmark_gpt.json" 2>&1 | tee "$OUT/benchmark_gpt.log"
    outcome $? "GPT benchmark"
    # Issue 22's record (>= 470k tokens/s, >= 40% MFU on one H200), through scripts/train.py itself.
    echo "== single-GPU record row: GPT-2 124M, context 1024, bf16, compiled, $RECORD_STEPS steps of batch" \
        "$RECORD_BATCH on memory-mapped shards (limit ${RECORD_SECONDS}s)"
    limited "$RECORD_SECONDS" "$PYTHON" scripts/gpu_record.py --out "$OUT/record" --steps "$RECORD_STEPS" \
        --batch-size "$RECORD_BATCH" 2>&1 | tee "$OUT/record.log"
    outcome $? "record row"
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
                first = ((found.get('message') or '').splitlines() or ['-'])[0]
                print(f"  {outcome}: {case.get('name')}: {first[:150]}")
else:
    print("GPU tests: no report (stopped before the end)")
record = out / "record.log"
if record.exists():  # its last "record:" line is the result, or says why there is none
    lines = [line for line in record.read_text().splitlines() if line.startswith("record:")]
    print(lines[-1] if lines else "record: no result (stopped before the end; see record.log)")
for name in ("benchmark.json", "benchmark_gpt.json"):
    if not (out / name).exists():
        continue
    result = json.loads((out / name).read_text())
    print(f"{name}: GPU", result["machine"].get("gpu"))
    if "table" not in result:  # stopped at its limit: the parts it finished are in the JSON
        print(f"  stopped before the end; finished parts: {', '.join(result.get('finished', [])) or 'none'}")
        for row in result.get("rows", []):  # the groups of loops measured before the stop
            print(f"  {row['device']} {row['model']} batch {row['batch_size']} {row['loop']}: "
                  f"{row['samples_per_s']:,.0f} samples/s")
        continue
    keep = ("book MLP", "matmul peak", "large MLP", "  cuda", "GPT", "  book", "  toyaccel")
    print("\n".join(line for line in result["table"].splitlines() if line.startswith(keep)))
EOF
if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: OK (logs in $OUT)"
