#!/usr/bin/env bash
# One GPU session in one command: install tileflow into the machine's Python, then run the
# stages named on the command line, each under its own time limit, logging to $OUT/<stage>.log;
# measured tables (bench/results/*.md) and tile timings are packed into $OUT/results.tar.gz.
#
#   BENCH_COMMIT=<hash> bash bench/gpu_session.sh tests:80 gemm:90 attention:150 e2e:240
#
# The device machine gets the working tree without .git: write the hash into the command here
# (`BENCH_COMMIT=$(git rev-parse --short HEAD)` would run there, find no repository and name
# every results file `...-unknown.md`). Results files are packed into $OUT/results.tar.gz after
# every stage and every GPU_SESSION_PACK_SECONDS (default 15) during one (each benchmark rewrites
# its table after every row), so a call cut short, the stage in progress too, still brings back
# what the finished rows measured.
#
# Stages: gemm (its stream-K and TMA columns at M = 1, 64, 512, 4096 only; GEMM_VARIANT_M sets
# bench/gemm.py's --variant-m: e.g. 512,4096, or all), gemm-quick, attention, attention-sweep (kernel configurations), e2e
# (prefill-shaped steps, mixed serving steps, request traces), e2e-prefill (the first part
# only), e2e-serving (the other two), profile (where a step's time goes,
# bench/profile_step.py), profile-base (the same at 256 tokens for another commit's tileflow: the
# tree PROFILE_BASE names, made by bench/base_tree.sh and carried to the device), sampling (a step's sampled tokens, eager and fused; bench/sampling.py), moe (Mixtral's and gpt-oss's expert GEMMs; bench/moe.py), tiles (bench/gemm.py --measure-tiles), gemm-measured (the GEMM table
# with plans from those tile times, or from the ones tileflow ships), tests (the kernel tests, compiled Triton), tests-gpu
# (tests/test_gpu.py: models, graphs and streams on CUDA). A stage that fails or runs out of
# time does not stop the next one; the script then exits 1 (naming those stages last), so the
# call's exit status says whether every stage passed. Narrower runs: ATTENTION_PARTS (default
# decode,prefill,mixed,mask,softcap,packed), E2E_TOKENS (default 256,1024,4096) and E2E_TRACE_REQUESTS
# (default 256). Every stage needs its limit (`gemm:90`, not `gemm`): a stage without one, or an
# unknown stage, is refused before anything runs.
set -u
# The variables this script reads, logged to env.log with the command line: a table's numbers
# are only comparable with the same narrowing.
SESSION_VARS="BENCH_COMMIT ATTENTION_PARTS E2E_TOKENS E2E_TRACE_REQUESTS GEMM_VARIANT_M PROFILE_BASE PYTHON OUT
              GPU_SESSION_PACK_SECONDS"
STAGES="gemm gemm-quick attention attention-sweep e2e e2e-prefill e2e-serving profile profile-base sampling moe tiles
        gemm-measured tests tests-gpu"
for item in "$@"; do
  name=${item%%:*}
  limit=${item#*:}
  # `timeout 'gemm' ...` exits 125 at once: a stage without its seconds was silently skipped.
  if [ "$item" = "$name" ] || ! [[ $limit =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_session.sh: stage '$item' needs a time limit in seconds, e.g. '$name:90'; nothing was run" >&2
    exit 2
  fi
  known=no
  for stage in $STAGES; do [ "$stage" = "$name" ] && known=yes; done
  if [ $known = no ]; then
    echo "gpu_session.sh: unknown stage '$name' (stages:" $STAGES"); nothing was run" >&2
    exit 2
  fi
  if [ "$name" = profile-base ] && ! [ -d "${PROFILE_BASE:-}/tileflow" ]; then
    echo "gpu_session.sh: profile-base needs PROFILE_BASE, a tree made by bench/base_tree.sh (carried to the" \
         "device), holding tileflow/; got '${PROFILE_BASE:-}'; nothing was run" >&2
    exit 2
  fi
done
# As given, before the defaults below fill them in.
GIVEN_VARS=$(for var in $SESSION_VARS; do
  if [ -n "${!var+set}" ]; then echo "$var=${!var}"; else echo "$var unset"; fi
done)
OUT=${OUT:-/tmp/tileflow-gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TILEFLOW_CACHE_DIR=/tmp/tileflow-cache
PY=${PYTHON:-python3}
E2E_TOKENS=${E2E_TOKENS:-256,1024,4096}
E2E_TRACE=${E2E_TRACE_REQUESTS:-256}

{
  date -u
  printf 'command:'
  printf ' %q' "$0" "$@"
  printf '\n'
  echo "$GIVEN_VARS"
  # Settings of tileflow, Inductor, Triton and CUDA given from outside change what is measured.
  env | grep -E '^(TILEFLOW_|TORCHINDUCTOR_|TORCH_|TRITON_|CUDA_)' | sort
  if [ -z "${BENCH_COMMIT:-}" ] && ! git rev-parse --short HEAD 2>/dev/null; then
    echo "WARNING: BENCH_COMMIT is not set and there is no git checkout here: results files will be named '-unknown'"
  fi
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  # Offline editable install (the machine has setuptools; it has no package index).
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || {
    echo "editable install failed: falling back to links in the working copy"
    ln -sfn ../backends tileflow/backends
    ln -sfn ../passes tileflow/passes
    # backend="tileflow" resolves through the torch_dynamo_backends entry point, which only an
    # install registers: without it e2e.py and the model tests raise InvalidBackend. Put the
    # install's metadata (name, version, that entry point) on the path instead, where Dynamo's
    # lookup (importlib.metadata) finds it, with no import of torch at every Python start.
    meta=$(mktemp -d "${TMPDIR:-/tmp}/tileflow-metadata.XXXXXX")
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
    info="$meta/tileflow-${version:-0}.dist-info"
    mkdir -p "$info"
    printf 'Metadata-Version: 2.1\nName: tileflow\nVersion: %s\n' "${version:-0}" >"$info/METADATA"
    printf '[torch_dynamo_backends]\ntileflow = tileflow.backend:tileflow_backend\n' >"$info/entry_points.txt"
    export PYTHONPATH=$PWD:$meta${PYTHONPATH:+:$PYTHONPATH}
    echo "PYTHONPATH=$PYTHONPATH"
  }
  $PY -c "import tileflow.backends.triton, tileflow.passes, torch._dynamo
torch._dynamo.lookup_backend('tileflow')
print('tileflow imports; backend=\"tileflow\" found')"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

PACK_SECONDS=${GPU_SESSION_PACK_SECONDS:-15}
[[ $PACK_SECONDS =~ ^[1-9][0-9]*$ ]] || PACK_SECONDS=15  # `n % 0` would end the packing loop

# bench/results into $OUT/results.tar.gz through a temporary archive ($1, in $OUT): a kill in the
# middle of tar must not leave a truncated archive where the earlier stages' one was.
pack_results() {
  tar czf "$OUT/$1" bench/results 2>/dev/null && mv -f "$OUT/$1" "$OUT/results.tar.gz"
}

# The tiles stage's file, named after the GPU it measures (an H100's times are not an H200's).
GPU_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' \
           | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
TILE_TIMINGS=bench/results/tile_timings-${GPU_SLUG:-gpu}.json

FAILED_STAGES=""  # "name:exit status" of each stage that failed or ran out of time
run_stage() {
  local name=$1 limit=$2 start rc flag packer
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  # Packed during the stage too: the device tool's timeout (timeout_s, the session's device
  # time) kills the whole call, and a stage cut so never reaches the pack after it, while only
  # $OUT comes back. The loop ends with the stage (its flag removed) or with this script.
  flag=$(mktemp "${TMPDIR:-/tmp}/gpu-session-stage.XXXXXX")
  ( n=0
    while sleep 1 && [ -e "$flag" ] && kill -0 $$ 2>/dev/null; do
      n=$(( n + 1 ))
      [ $(( n % PACK_SECONDS )) -eq 0 ] && pack_results .results-during-stage.tmp
    done ) &
  packer=$!
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || FAILED_STAGES="$FAILED_STAGES $name:$rc"
  rm -f "$flag"
  wait "$packer" 2>/dev/null
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
  grep -E "FAILED|FAIL:|Error:" "$OUT/$name.log" | cut -c1-240 | head -n 14
  grep -vE "FAILED|PASSED|SKIPPED|FAIL:|Error:|Warning|warn" "$OUT/$name.log" | tail -n 16
  # After every stage, not only at the end: if the whole call is stopped (the device tool's
  # timeout_s, the session's device time), the tables measured so far still come back.
  pack_results .results.tmp
}

for item in "$@"; do
  name=${item%%:*}
  limit=${item##*:}
  case $name in
    gemm) run_stage gemm "$limit" $PY bench/gemm.py --variant-m "${GEMM_VARIANT_M:-1,64,512,4096}" ;;
    gemm-quick) run_stage gemm-quick "$limit" $PY bench/gemm.py --quick ;;
    attention) run_stage attention "$limit" $PY bench/attention.py --parts "${ATTENTION_PARTS:-decode,prefill,mixed,mask,softcap,packed}" ;;
    attention-sweep) run_stage attention-sweep "$limit" $PY bench/attention.py --sweep ;;
    e2e) run_stage e2e "$limit" $PY bench/e2e.py --layers 2 --tokens "$E2E_TOKENS" --trace-requests "$E2E_TRACE" ;;
    e2e-prefill) run_stage e2e-prefill "$limit" $PY bench/e2e.py --layers 2 --tokens "$E2E_TOKENS" --parts prefill ;;
    e2e-serving) run_stage e2e-serving "$limit" $PY bench/e2e.py --layers 2 --tokens "$E2E_TOKENS" --parts mixed,trace \
                   --trace-requests "$E2E_TRACE" ;;
    profile) run_stage profile "$limit" $PY bench/profile_step.py --layers 2 --tokens 256,4096 ;;
    # The forward steps' profile at the commit whose tree PROFILE_BASE holds (bench/base_tree.sh),
    # 256 tokens, no results file (the log holds it): an A/B against the profile stage.
    profile-base) base=$(cd "$PROFILE_BASE" && pwd)
                  ln -sfn ../backends "$base/tileflow/backends"
                  ln -sfn ../passes "$base/tileflow/passes"
                  PYTHONPATH=$base${PYTHONPATH:+:$PYTHONPATH} run_stage profile-base "$limit" \
                    $PY bench/profile_step.py --layers 2 --tokens 256 --steps-only --no-write ;;
    sampling) run_stage sampling "$limit" $PY bench/sampling.py ;;
    moe) run_stage moe "$limit" $PY bench/moe.py ;;
    tiles) run_stage tiles "$limit" $PY bench/gemm.py --measure-tiles "$TILE_TIMINGS" ;;
    # This session's tile times where the tiles stage wrote them, else the ones tileflow ships.
    gemm-measured) timings=$TILE_TIMINGS; [ -f "$timings" ] || timings=auto
                   run_stage gemm-measured "$limit" $PY bench/gemm.py --tile-timings "$timings" ;;
    # Per-test timeout, an early stop and one line per test as it ends (-v), so the failures'
    # names are in the log even when the stage's limit cuts the run before pytest's summary.
    # One Inductor compile thread per worker: 16 workers each starting a pool of 16 starve the
    # machine and push model tests past their timeout.
    tests) TORCHINDUCTOR_COMPILE_THREADS=1 run_stage tests "$limit" $PY -m pytest -v -rf --tb=short \
             -p no:cacheprovider -n 16 --maxfail=12 --timeout=45 tests/test_triton_gemm.py \
             tests/test_triton_attention.py tests/test_grouped_gemm.py \
             tests/test_gpu.py::test_all_reduces_split_on_the_network_stream_match_eager ;;
    # The model, stream and graph tests: fewer workers, a longer per-test limit, and the thread
    # method, which dumps every stack of a test that overruns and names it. The per-test limit
    # stays 40 s (at least half the stage) under the stage's: at the stage's own limit, the
    # stage is killed first and no stack is dumped.
    tests-gpu) TORCHINDUCTOR_COMPILE_THREADS=1 run_stage tests-gpu "$limit" $PY -m pytest -v -rf --tb=short \
                 -p no:cacheprovider -n 4 --timeout=$(( limit - 40 > limit / 2 ? limit - 40 : limit / 2 )) \
                 --timeout-method=thread tests/test_gpu.py ;;
    *) echo "unknown stage $name" ;;
  esac
done

pack_results .results.tmp
ls -la "$OUT"
if [ -n "$FAILED_STAGES" ]; then
  echo "gpu_session.sh: stages that failed or ran out of time (name:exit status):$FAILED_STAGES"
  exit 1
fi
