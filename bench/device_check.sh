#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions run via bash -c "$(declare -f NAME); NAME"
# bench/device_check.sh: everything in lowrank_ops that needs a GPU, in one run.
#
#   bash bench/device_check.sh                      # on the lent GPU: results under $OUT
#   GIT_COMMIT=<sha> bash bench/device_check.sh     # record the commit (the device copy has no .git)
#
# Steps (each guarded by a timeout; a failing step never stops the later ones; $LRO_STEPS picks
# a subset, default all, in this order):
#   env      nvidia-smi, versions, device properties              -> env.txt
#   import   make the source checkout importable without network   (sitecustomize shim, see below)
#   build    csrc/ -> lowrank_ops/_C*.so for this GPU's arch only  (lowrank_ops/core/cuda_build.py)
#   tests    the gpu lane: pytest -m gpu $LRO_TEST_PATHS            -> pytest-gpu.xml
#            (files whose kernels never ran on a GPU first; pytest gets SIGINT 20 s before the
#            step's cap, so a capped run still writes its junit file and failure summary)
#   kvcache  python -m lowrank_ops.benchmarks.kvcache --quick       -> kvcache-quick.json
#   quant    python -m lowrank_ops.benchmarks.quant --quick         -> quant-quick.json
#            (by default only the configurations and methods the targets need, see DEFAULT_ARGS)
#   sparse   python -m lowrank_ops.benchmarks.sparse --quick        -> sparse-quick.json
#   lowrank  python -m lowrank_ops.benchmarks.lowrank --quick       -> lowrank-quick.json
#   profile  python bench/kernel_profile.py: device time per kernel of the cases that miss their
#            targets, GEAR by sequence-split count                  -> log.txt only
#   counters python bench/gear_counters.py: Nsight Compute counters of the GEAR decode kernels
#            (issue rate, warps per scheduler, stall reasons; $LRO_COUNTERS_ARGS) -> log.txt only
#   sanitize compute-sanitizer ($LRO_SANITIZE_TOOLS, default racecheck synccheck memcheck
#            initcheck) on small cases of the CUDA GEAR kernel's gpu-lane file, only kernels
#            named gear_* instrumented                                -> log.txt only
#   summary  steps, test counts, one line per benchmark case        -> summary.txt (printed last)
# plus log.txt (everything printed): 8 files, the most the device tool returns. Every suite
# rewrites its JSON after each case, so a step stopped by its cap keeps what it measured.
# Plot here afterwards: python bench/plot.py <suite>-quick.json.
#
# Importing the checkout: setup.py maps the package lowrank_ops.kernels to the top-level
# kernels/ folder, so plain PYTHONPATH=<repo> cannot import lowrank_ops.kernels. The device
# has no network, so this script does not pip-install by default; it writes a sitecustomize.py
# into a temporary folder put first on PYTHONPATH whose meta-path finder maps
# lowrank_ops.kernels -> <repo>/kernels (exactly the package_dir mapping) and then chains to
# any other sitecustomize. No symlinks, nothing written into the checkout, and it also holds
# for pytest-xdist workers and subprocesses. If that check fails it falls back to
# `pip install --no-index --no-build-isolation --no-deps -e .` (setuptools and pybind11 are in
# the image; LOWRANK_OPS_CUDA_ARCHS limits any csrc build there to this GPU's arch).
#
# Budget (one H100, measured 2026-11-26): env ~10 s, import ~5 s, build ~17 s (24-27 s with
# csrc/gear_decode.cu, 2026-11-27), the gpu lane of
# the low-rank and quant families ~210 tests per 155 s with 4 workers (Triton compiles and
# autotunes each new shape/M-bucket/dtype), lowrank ~35 s, quant: the first case ~50 s of
# autotuning. Each step has a cap ($LRO_CAP_<STEP>, seconds) and a hard deadline
# ($LRO_BUDGET_S, default 500 s) trims the caps so the summary always prints in a 600 s call.
#
# Knobs: PYTHON (default python3), OUT, LRO_BUDGET_S, LRO_STEPS (e.g. "build tests quant"),
# LRO_TEST_PATHS (default: every file with gpu tests, in priority order), LRO_TEST_WORKERS (pytest-xdist workers, default 8, 0 =
# serial), LRO_CAP_TESTS (150) / _LOWRANK (60) / _QUANT (90) / _SPARSE (75) / _KVCACHE (75) / _PROFILE (60)
# / _COUNTERS (120) / _SANITIZE (150),
# LRO_RESERVE_TESTS (300: what the tests step leaves for the suites), LRO_<SUITE>_ARGS (extra
# arguments for one suite, e.g. LRO_QUANT_ARGS="--configs 4b,3b+1%"), LRO_BENCH_MODE (quick;
# "cpu-smoke" runs the benchmark and summary steps on a CPU-only machine).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUTDIR=${OUT:-$REPO/bench/results/local-$STAMP}
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${LRO_BUDGET_S:-500}
WORKERS=${LRO_TEST_WORKERS:-8}
BENCH_MODE=${LRO_BENCH_MODE:-quick}   # cpu-smoke: exercise the benchmark and summary steps on a CPU machine
# the open issue's family (GEAR, issue 5) first, then the families whose speed has never been
# measured; low-rank was measured on d6cbff8
SUITES="kvcache quant sparse lowrank"
declare -A DEFAULT_CAPS=([lowrank]=60 [quant]=90 [sparse]=75 [kvcache]=75)  # seconds; 300 in all
# quant: the configurations the issue's targets name, our CUDA and auto-Triton rows only (each
# forced Triton path and each configuration autotunes its own kernels: the whole quick plan
# ran past its 90 s cap on the first case in the 2026-11-26 run)
declare -A DEFAULT_ARGS=([quant]="--methods cuda,triton --configs 4b,4b+1%,3b+1%,4b+r64")
WANT=" ${LRO_STEPS:-env build tests $SUITES profile counters sanitize} "
# every test file with gpu-marked tests (a CPU test checks the list): the launch cache's (every
# Triton launch goes through it; never run on a GPU yet), GEAR's, then the files
# with cases the 2026-11-27 runs did not reach or that changed after them (the quant dequant and
# N:M expand paths), the CUDA-kernel files last (unchanged since they all passed on 2026-11-27)
GPU_TEST_FILES="tests/test_launch_cache.py tests/test_gpu_kvcache_cuda.py tests/test_gpu_kvcache_attention.py tests/test_kvcache_hf.py tests/test_kernels_kvcache_compress_interp.py
    tests/test_kernels_kvcache_lowrank_interp.py tests/test_kernels_kvcache_decompress_interp.py tests/test_kvcache_store.py
    tests/test_gpu_quant.py tests/test_gpu_sparse.py tests/test_sparse_ops.py tests/test_sparse_format.py
    tests/test_gpu_lowrank.py tests/test_gpu_cuda_decode.py tests/test_gpu_quant_cuda.py"
TEST_PATHS=${LRO_TEST_PATHS:-$GPU_TEST_FILES}
# the sanitize step: racecheck first (the CUDA kernel's shared-memory ring has never run on a GPU
# under a checker); small cases of every format, split count, sequence shape and row count
SANITIZE_TOOLS=${LRO_SANITIZE_TOOLS:-racecheck synccheck memcheck initcheck}
SANITIZE_TESTS="(test_formats_vs_reference and fp16) or test_split_counts_agree or test_sequence_shapes or test_rows_per_kv_head"
BOOT=$(mktemp -d "${TMPDIR:-/tmp}/lowrank_ops_boot.XXXXXX")
export PYTHONUNBUFFERED=1 LOWRANK_OPS_REPO="$REPO" REPO OUTDIR PY WORKERS TEST_PATHS SANITIZE_TOOLS SANITIZE_TESTS
unset TRITON_INTERPRET

STEPS=()   # "name verdict seconds" lines for the summary
DEADLINE=$((SECONDS + BUDGET))

# step NAME CAP_SECONDS CMD...: run CMD under `timeout`, at most CAP_SECONDS and never past the
# deadline (keeping RESERVE seconds for the steps after it); record the verdict; always return 0.
RESERVE=0
LAST_RC=0
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        echo "=== [$name] skipped: no time left in the ${BUDGET}s budget"
        STEPS+=("$(printf '%-8s %-14s %5s' "$name" "NO-TIME" "0s")")
        LAST_RC=125
        return 0
    fi
    echo
    local what="$*"
    [ "$1" = bash ] && what="${what##*; }"   # bash -c "$(declare -f fn); fn": show just fn
    echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $what"
    local t0=$SECONDS
    STEP_LIMIT=$limit timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMEOUT(${limit}s)"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAIL(rc=$rc)"
    fi
    echo "=== [$name] $verdict after $((SECONDS - t0))s"
    STEPS+=("$(printf '%-8s %-14s %5ss' "$name" "$verdict" "$((SECONDS - t0))")")
    LAST_RC=$rc
    return 0
}

tree_id() {  # content hash of the sources, to match a device run with a local checkout
    find lowrank_ops kernels csrc tests bench setup.py pyproject.toml -type f \
        \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' -o -name '*.toml' \) \
        -not -path '*/__pycache__/*' -not -path 'bench/results/*' 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-12
}

write_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "host: $(hostname) | kernel: $(uname -r) | repo: $REPO"
        echo "git_commit: ${LOWRANK_OPS_GIT_COMMIT}"
        echo
        echo "## nvidia-smi"
        nvidia-smi 2>&1 || echo "(nvidia-smi failed)"
        echo
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv 2>&1
        echo
        echo "## nvcc"
        nvcc --version 2>&1 || echo "(no nvcc on PATH)"
        echo
        echo "## python"
        "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "L2", getattr(p, "L2_cache_size", "?"), "mem", p.total_memory)
for mod in ("pybind11", "setuptools", "xdist", "pytest_timeout", "matplotlib"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except Exception:
        print(mod, "MISSING")
EOF
    } >"$OUTDIR/env.txt" 2>&1
    cat "$OUTDIR/env.txt"
}

make_shim() {
    cat >"$BOOT/sitecustomize.py" <<'EOF'
"""Written by bench/device_check.sh: import the lowrank_ops source checkout as if installed.

setup.py maps the package ``lowrank_ops.kernels`` to the top-level ``kernels/`` folder; this
meta-path finder applies the same mapping to imports from the checkout in $LOWRANK_OPS_REPO.
"""
import importlib.abc
import importlib.util
import os
import sys

_REPO = os.environ.get("LOWRANK_OPS_REPO", "")


class _LowrankOpsKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lowrank_ops.kernels" or not _REPO:
            return None
        folder = os.path.join(_REPO, "kernels")
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.insert(0, _LowrankOpsKernelsFinder())


def _chain_other_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    me = sys.modules.pop("sitecustomize", None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        import sitecustomize  # noqa: F401  (another one further down the path, if any)
    except ImportError:
        pass
    except Exception as exc:  # pragma: no cover
        print(f"lowrank_ops boot: the other sitecustomize failed: {exc}", file=sys.stderr)
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules.setdefault("sitecustomize", me)


_chain_other_sitecustomize()
EOF
}

check_import() {
    timeout 90 "$PY" - <<'EOF'
import os, sys
from pathlib import Path
repo = Path(os.environ["LOWRANK_OPS_REPO"]).resolve()
import lowrank_ops, lowrank_ops.kernels
for mod in (lowrank_ops, lowrank_ops.kernels):
    where = Path(mod.__file__).resolve()
    print(f"{mod.__name__}: {where}")
    if repo not in where.parents:
        sys.exit(f"{mod.__name__} is imported from {where}, not from {repo}")
import lowrank_ops.kernels.lowrank
import lowrank_ops.benchmarks.lowrank
print("import ok")
EOF
}

do_import() {
    make_shim
    export PYTHONPATH="$BOOT:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if check_import; then
        return 0
    fi
    echo "shim import failed; falling back to pip install --no-index --no-build-isolation --no-deps -e ."
    export PYTHONPATH="$REPO"
    timeout 180 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$REPO" && check_import
}

build_csrc() {
    "$PY" - <<'EOF'
import os, sys, time
from pathlib import Path
import torch
from lowrank_ops.core import cuda_build

repo = Path(os.environ["LOWRANK_OPS_REPO"])
archs = os.environ["LOWRANK_OPS_CUDA_ARCHS"]
t0 = time.perf_counter()
# In place, where `import lowrank_ops._C` finds it (what an install's build would produce).
path = cuda_build.build(repo / "lowrank_ops", archs=archs, verbose=True)
print(f"built {path} (sm_{archs}) in {time.perf_counter() - t0:.1f}s")
# cuda_ext.load() finds lowrank_ops._C through the normal import system, in every process.
from lowrank_ops.core import cuda_ext
cuda_ext.reset()
mod = cuda_ext.load()
print("cuda_ext.load():", getattr(mod, "__file__", None), "| available:", cuda_ext.available(),
      "|", cuda_ext.unavailable_reason() or "ok")
# The verdict that matters: does the op's CUDA backend serve a decode call?
from lowrank_ops.lowrank import cuda_decode
x = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
verdict = cuda_decode.supports(x, 512)
print("cuda_decode.supports(M=1, K=4096, r=512, fp16):", verdict)
sys.exit(0 if verdict.ok else 3)
EOF
}

run_tests() {
    local extra=()
    if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
        extra+=(-n "$WORKERS")
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        extra+=(--timeout=150)
    fi
    # SIGINT before the step's hard cap: pytest stops, prints its summary and writes the junit file
    local soft=$(( ${STEP_LIMIT:-150} > 40 ? ${STEP_LIMIT:-150} - 20 : ${STEP_LIMIT:-150} ))
    # shellcheck disable=SC2086  # TEST_PATHS is a word list on purpose
    timeout -s INT --kill-after=15 "$soft" \
        "$PY" -m pytest -m gpu $TEST_PATHS -q -rfEs -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUTDIR/pytest-gpu.xml" ${extra[@]+"${extra[@]}"}
    local rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "gpu lane stopped at its soft limit (${soft}s): the junit file holds the tests that ran"
        return "$rc"
    fi
    if [ "$rc" -ge 2 ] && [ "$rc" -ne 5 ] && [ "${#extra[@]}" -gt 0 ]; then
        echo "pytest exited $rc with plugins (${extra[*]}); rerunning serially"
        # shellcheck disable=SC2086
        "$PY" -m pytest -m gpu $TEST_PATHS -q -rfEs -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUTDIR/pytest-gpu.xml"
        rc=$?
    fi
    return "$rc"
}

# compute-sanitizer, one process per tool; exit 3 = the tool found an error, 1 = a test failed
sanitize() {
    local cs tool rc=0
    cs=$(command -v compute-sanitizer || find /usr/local/cuda*/bin -name compute-sanitizer 2>/dev/null | head -1)
    if [ -z "$cs" ]; then
        echo "no compute-sanitizer on this machine"
        return 2
    fi
    for tool in $SANITIZE_TOOLS; do
        echo "--- compute-sanitizer --tool $tool"
        # no caching allocator: every tensor its own allocation, so memcheck sees a read past its end
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --kernel-name kns=gear_ --error-exitcode 3 \
            --print-limit 20 "$PY" -m pytest -m gpu tests/test_gpu_kvcache_cuda.py -q -p no:cacheprovider \
            -k "$SANITIZE_TESTS" || rc=$?
    done
    return "$rc"
}

summary() {
    {
        echo "==================== lowrank_ops device check summary ===================="
        echo "commit ${LOWRANK_OPS_GIT_COMMIT} | $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) | total $((SECONDS))s"
        printf '%s\n' "${STEPS[@]}"
        "$PY" - "$OUTDIR/pytest-gpu.xml" <<'EOF' 2>&1
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:
    print(f"gpu tests: no junit file ({exc})")
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"gpu tests: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped")
for case in root.iter("testcase"):
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            msg = (node.get("message") or "").splitlines()[0][:110] if node.get("message") else ""
            print(f"  {tag.upper()} {case.get('name')}: {msg}")
EOF
        local suite
        for suite in $SUITES; do
            if [ -f "$OUTDIR/$suite-$BENCH_MODE.json" ]; then
                "$PY" -m "lowrank_ops.benchmarks.$suite" --summarize "$OUTDIR/$suite-$BENCH_MODE.json" 2>&1
            elif [[ "$WANT" == *" $suite "* ]]; then
                echo "$suite benchmarks: no results file"
            fi
        done
        echo "files: $(cd "$OUTDIR" && find . -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort | tr '\n' ' ')"
    } >"$OUTDIR/summary.txt" 2>&1
    cat "$OUTDIR/summary.txt"
}

wants() { [[ "$WANT" == *" $1 "* ]]; }

# suite_setting KIND SUITE DEFAULT: $LRO_<KIND>_<SUITE> (e.g. LRO_CAP_QUANT), else DEFAULT;
# the older per-suite argument names LRO_BENCH_ARGS / LRO_QUANT_ARGS still work.
suite_setting() {
    local name="LRO_${1}_${2^^}"
    [ "$1" = ARGS ] && name="LRO_${2^^}_ARGS"
    [ "$1 $2" = "ARGS lowrank" ] && [ -n "${LRO_BENCH_ARGS:-}" ] && name=LRO_BENCH_ARGS
    echo "${!name:-$3}"
}

main() {
    echo "lowrank_ops device check | repo $REPO | out $OUTDIR | budget ${BUDGET}s | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ -z "${LOWRANK_OPS_GIT_COMMIT:-}" ]; then
        LOWRANK_OPS_GIT_COMMIT=${GIT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)}
        if [ -z "$LOWRANK_OPS_GIT_COMMIT" ]; then
            LOWRANK_OPS_GIT_COMMIT="unknown+tree:$(tree_id)"
        fi
    fi
    export LOWRANK_OPS_GIT_COMMIT

    wants env && RESERVE=60 step env 40 bash -c "$(declare -f write_env); write_env"

    # Only this GPU's architecture (H100/H200: 90): the fastest csrc build (also for
    # the pip fallback of the import step, whose setup.py would build csrc/).
    LOWRANK_OPS_CUDA_ARCHS=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" 2>/dev/null || echo 90)
    export LOWRANK_OPS_CUDA_ARCHS

    # import: runs in this shell (it exports PYTHONPATH); guarded by the checks inside.
    echo
    echo "=== [import] $(date -u +%H:%M:%S)"
    local t0=$SECONDS verdict=ok
    if ! do_import; then verdict=FAIL; fi
    STEPS+=("$(printf '%-8s %-14s %5ss' import "$verdict" "$((SECONDS - t0))")")

    if wants build; then
        # the build keeps 300 s for the later steps, less under a small budget so that it still gets
        # ~130 s (a 330 s budget once left it 12 s: nothing was built and the CUDA tests all skipped)
        local build_reserve=$((BUDGET - 150 < 300 ? BUDGET - 150 : 300))
        RESERVE=$((build_reserve > 0 ? build_reserve : 0)) step build 120 bash -c "$(declare -f build_csrc); build_csrc"
        if [ "$LAST_RC" -eq 0 ]; then
            export LOWRANK_OPS_REQUIRE_CUDA_EXT=1   # built: an unavailable CUDA backend is now a test failure
        fi
    fi

    # keep time for the benchmark suites and the summary
    # the gpu lane gets what the suites leave: by default 150 s, keeping 300 s for the four suites
    wants tests && RESERVE=${LRO_RESERVE_TESTS:-300} step tests "${LRO_CAP_TESTS:-150}" bash -c "$(declare -f run_tests); run_tests"

    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null | sed 's/^/gpu state before the benchmarks: /'
    local suite cap args
    for suite in $SUITES; do
        wants "$suite" || continue
        cap=$(suite_setting CAP "$suite" "${DEFAULT_CAPS[$suite]}")
        args=$(suite_setting ARGS "$suite" "${DEFAULT_ARGS[$suite]:-}")
        # no new case starts after the soft budget (the cap less a margin for the case in flight)
        # shellcheck disable=SC2086  # args is a word list on purpose
        RESERVE=15 step "$suite" "$cap" "$PY" -m "lowrank_ops.benchmarks.$suite" "--$BENCH_MODE" --out "$OUTDIR" \
            --time-budget $((cap * 2 / 3)) $args
    done
    wants profile && RESERVE=10 step profile "${LRO_CAP_PROFILE:-60}" "$PY" bench/kernel_profile.py
    # shellcheck disable=SC2086  # the arguments are a word list on purpose
    wants counters && RESERVE=10 step counters "${LRO_CAP_COUNTERS:-120}" "$PY" bench/gear_counters.py ${LRO_COUNTERS_ARGS:-}
    wants sanitize && RESERVE=10 step sanitize "${LRO_CAP_SANITIZE:-150}" bash -c "$(declare -f sanitize); sanitize"
    echo
    summary
    # exit status: 0 only if every step passed (the files under $OUT are written either way)
    case "${STEPS[*]}" in
        *FAIL* | *TIMEOUT* | *NO-TIME*) return 1 ;;
    esac
    return 0
}

main 2>&1 | tee "$OUTDIR/log.txt"
rc=$?
rm -rf "$BOOT"
exit "$rc"
