#!/bin/bash
# The GPU checks and measurements of the decode-path work built without a GPU, in one device call:
#
#   bash benchmarks/device_check.sh OUT_DIR tests|bench|tp-tests|tp-bench [LAYERS=48]
#
# tests: the tests of the new kernels and switches on CUDA (the kernel files whole: their CPU-shape tests run
#   on the GPU too), each file in its own process (an illegal access poisons every later test of a process);
# bench: bench_gdn_decode (the GDN decode step's three forms), then ab_decode_switches (the FP8 batch-1 decode
#   graph of LAYERS layers under each switch, one round);
# tp-tests (two GPUs): the all-reduce tests at tp 2, the fused all-reduce + norm's among them, and the engine's
#   tp 2 against tp 1; tp-bench (two GPUs): bench_all_reduce, then bench_tp (LAYERS layers, default 4 here).
# Each step has a time limit, so that a hang costs only its step; each part fits one 10-minute device call.
# OUT_DIR gets tests.log, or gdn_decode.json, summary.json and runs.tgz, or tp-tests.log, or all_reduce.json
# and tp.json.
set -u
out=$1; part=$2; layers=${3:-48}
export PYTHONUNBUFFERED=1
log="$out/$part.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"

run_tests() {  # name, then pytest arguments; LIMIT seconds (240)
  local name=$1; shift
  echo "=== $name: pytest $*" >> "$log"
  timeout "${LIMIT:-240}" python -m pytest -q -p no:cacheprovider "$@" >> "$log" 2>&1
  echo "[$name] rc=$? $(tail -1 "$log")"
}
if [ "$part" = tests ]; then
run_tests gdn_decode tests/kernels/test_gdn_decode.py
run_tests fp8_linear tests/kernels/test_fp8_linear.py -k "all_tokens or dense or gdn_input or real_shapes"
run_tests paged_attention tests/kernels/test_paged_attention.py -k "groups or real_shapes"
run_tests moe_fp8 tests/kernels/test_moe_fp8.py -k "packed or real or gpu"
run_tests router_norm tests/kernels/test_add_rms_norm.py tests/test_router_after_norm.py
run_tests decode_graphs tests/gpu/test_decode_graphs.py -k "gdn_decode_forms or programmatic"
run_tests no_host_sync tests/gpu/test_no_host_sync.py
run_tests fp8_engine tests/gpu/test_fp8_engine_gpu.py
LIMIT=90 run_tests one_shot_norm tests/kernels/test_one_shot_add_rms_norm.py  # two streams meet through flags
exit 0
fi
if [ "$part" = tp-tests ]; then
LIMIT=360 run_tests all_reduce tests/gpu/test_all_reduce_gpu.py
LIMIT=200 run_tests engine_tp tests/gpu/test_engine_gpu.py -k tp2
exit 0
fi
if [ "$part" = tp-bench ]; then
echo "=== bench_all_reduce"
timeout 150 python benchmarks/bench_all_reduce.py --out "$out/all_reduce.json" 2>&1 >/dev/null | tail -12
echo "=== bench_tp (${3:-4} layers)"
timeout 420 python benchmarks/bench_tp.py --layers "${3:-4}" --out "$out/tp.json" 2>&1 >/dev/null | tail -20
exit 0
fi

echo "=== bench_gdn_decode"
timeout 150 python benchmarks/bench_gdn_decode.py --out "$out/gdn_decode.json" 2>&1 >/dev/null | tail -12
echo "=== ab_decode_switches ($layers layers, batch 1, one round)"
timeout 420 bash benchmarks/ab_decode_switches.sh "$out" "$layers" 1 1 | tail -40
