#!/usr/bin/env bash
# Sanitised native run (a CI step after the main pytest).
#
# Compiles csrc/'s CPU sources a second time with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize/ (the installed hyperflow_ext._C stays as it is), then runs the native and
# kernel tests against that build, with OpenMP at 1 and at 2 threads. Like setup.py, it compiles the
# per-ISA kernel sources (csrc/cpu/*.cpp) once per ISA path of csrc/isa_flags.txt, and the kernel test
# modules run on every path this CPU supports (tests/conftest.py), so each path is sanitised. The package loads the
# sanitised module through $HYPERFLOW_NATIVE_CPU (hyperflow_ext/native.py). Any ASan or UBSan
# report aborts the run (halt_on_error) and fails this script; a report file left in the log
# directory fails it too.
#
# Environment: HYPERFLOW_SANITIZE_DIR (build dir, default build/sanitize), HYPERFLOW_SANITIZE_MARCH
# (-march value, default x86-64), HYPERFLOW_SANITIZE_TESTS (pytest arguments, default the list below),
# HYPERFLOW_SANITIZE_THREADS (default "1 2"). The vector paths the generic build leaves out are
# checked against overruns by tests/test_guard_pages.py in the main run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${HYPERFLOW_SANITIZE_DIR:-$PWD/build/sanitize}"
LOGS="$OUT/reports"
mkdir -p "$OUT/obj" "$LOGS"
rm -f "$LOGS"/*

CXX="${CXX:-c++}"
# The CI venv installed the project with build isolation, so pybind11's headers may be missing from it.
python -c "import pybind11" 2>/dev/null || python -m pip install -q pybind11
SUFFIX="$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
PYBIND="$(python -c 'import pybind11; print(pybind11.get_include())')"
PYINC="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
# GCC does not instrument masked vector loads/stores and gathers (builtins of the AVX-512 paths), so
# the default is the generic x86-64 build, whose scalar fallbacks ASan checks access by access;
# the avx2 / avx512 paths are compiled with their own flags, so ASan checks their other accesses
# (tests/test_guard_pages.py covers the masked ones in the main run, on every path).
# HYPERFLOW_SANITIZE_MARCH applies to the generic code and the baseline path.
MARCH="${HYPERFLOW_SANITIZE_MARCH-x86-64}"
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
CXXFLAGS="-std=c++17 -O1 -g -fPIC -fvisibility=hidden -fopenmp -Wall -Wno-unknown-pragmas -Wno-maybe-uninitialized $SAN"
CXXFLAGS+=" -DHF_SANITIZE=\"address,undefined\" -Icsrc/include -Icsrc -I$PYBIND -I$PYINC"
MARCHFLAG=""
[ -n "$MARCH" ] && MARCHFLAG="-march=$MARCH"
MODULE="$OUT/_C$SUFFIX"

echo "[sanitize] compiling csrc/ CPU sources into $MODULE"
# One job per line: "<object> <isa flags>|<source>"; generic sources get no ISA, per-ISA ones each path.
JOBS=()
for src in csrc/module_cpu.cpp csrc/dispatch.cpp; do JOBS+=("$OUT/obj/$(basename "$src").o|$src|$MARCHFLAG"); done
while read -r isa flags; do
  case "$isa" in ''|'#'*) continue ;; esac
  mkdir -p "$OUT/obj/$isa"
  for src in csrc/cpu/*.cpp; do JOBS+=("$OUT/obj/$isa/$(basename "$src").o|$src|-DHF_ISA=$isa ${flags:-$MARCHFLAG}"); done
done < csrc/isa_flags.txt
export CXX CXXFLAGS
printf '%s\n' "${JOBS[@]}" | xargs -P "${MAX_JOBS:-$(nproc)}" -I{} sh -c '
  IFS="|" read -r obj src isa <<EOF_JOB
$1
EOF_JOB
  $CXX $CXXFLAGS $isa -c "$src" -o "$obj"' _ {}
OBJECTS=()
for job in "${JOBS[@]}"; do OBJECTS+=("${job%%|*}"); done
# shellcheck disable=SC2086
"$CXX" -shared -fopenmp $SAN "${OBJECTS[@]}" -o "$MODULE"

# python does not link libstdc++: preloaded after libasan, so ASan's __cxa_throw interceptor finds the
# real one (otherwise the first C++ exception, e.g. a native argument check, aborts in an ASan CHECK).
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
export HYPERFLOW_NATIVE_CPU="$MODULE"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$LOGS/ubsan"
# The sanitised module really is the one that loads:
(cd "$OUT" && python -c "import hyperflow_ext as hf; b = hf.native.cpu_module().build_info(); print('[sanitize] loaded', hf.native.cpu_module().__file__, '|', b); assert 'sanitize' in b, b")

TESTS="${HYPERFLOW_SANITIZE_TESTS:-tests/test_native.py tests/test_sparse_kernels.py tests/test_sparse_conv.py tests/test_flow_ops.py tests/test_drift_kernels.py tests/test_norm.py tests/test_checked_once.py tests/test_kernel_properties.py tests/test_native_threads.py tests/test_sparse_network.py}"
status=0
for threads in ${HYPERFLOW_SANITIZE_THREADS:-1 2}; do
  echo "[sanitize] OMP_NUM_THREADS=$threads: $TESTS"
  # plain `pytest` (not python -m): the installed package is imported, not the source tree
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$threads pytest -q -p no:cacheprovider $TESTS || status=$?
  if compgen -G "$LOGS/*" > /dev/null; then
    echo "[sanitize] sanitizer reports (OMP_NUM_THREADS=$threads):"
    cat "$LOGS"/*
    status=1
  fi
  [ "$status" -ne 0 ] && break
done
[ "$status" -eq 0 ] && echo "[sanitize] clean: no ASan/UBSan reports"
exit "$status"
