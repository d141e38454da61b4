#!/usr/bin/env bash
# The 2-GPU runs, one stage per device call (a call is capped at 10 minutes); results go to $OUT.
#
#   bash bench/gpu_x2.sh pp-smoke   # tiny pp job on NCCL; if it stalls, every rank's stacks (SIGUSR1)
#   bash bench/gpu_x2.sh pp         # issue 5: PP0 D sweep, wan-14b on GPU1, Stage 0 on GPU0
#   bash bench/gpu_x2.sh tp         # issue 7: eager vs compiled, TP=1 and TP=2, same run
#   bash bench/gpu_x2.sh matrix-a   # issue 6: the NCCL matrix, first half of the rows
#   bash bench/gpu_x2.sh matrix-b   #          second half
# One GPU is enough for these (every rank its own emulated NCCL host, bench/emulated_hosts.sh):
#   bash bench/gpu_x2.sh emulated-pp       # PP0 and PP1 (soft + immediate cut) on NCCL
#   bash bench/gpu_x2.sh emulated-matrix-a # the NCCL rows of the matrix, first half (logs kept)
#   bash bench/gpu_x2.sh emulated-matrix-b #   second half
# Matrix output is written to $OUT as it goes (a call cut at the device limit keeps what ran).
#
# Wheels missing from the GPU image (PyAV, pytest, safetensors, ...) travel in .whl/.
set -u
stage=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:/tmp/site
# NVLink multicast off (the device README), also inherited by every rank the launcher starts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
WAN=(--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576 --steps 4)

case $stage in
pp-smoke)
    python -m streamdit run --topology pp --nproc 2 --device cuda --height 32 --width 48 --chunks 4 \
        --out "$OUT/smoke.npy" --log-level INFO >"$OUT/smoke.log" 2>&1 &
    job=$!
    for _ in $(seq 90); do kill -0 $job 2>/dev/null || break; sleep 1; done
    if kill -0 $job 2>/dev/null; then
        echo "pp smoke still running after 90 s: stacks of every streamdit process"
        pkill -USR1 -f "streamdit run --topology pp" ; sleep 3; pkill -9 -f "streamdit run" ; sleep 1
    fi
    wait $job; echo "pp smoke exit $?"
    tail -60 "$OUT/smoke.log"
    ;;
pp)
    python bench/bench_pp.py --out "$OUT/pp0_wan14b_h200x2.json" --chunks 12 --skip 4 --job-timeout 110
    ;;
tp)
    python bench/bench_tp.py --variants eager,eager-inplace,compile,compile-inplace-disabled \
        --iters 6 --warmup 2 --out "$OUT/tp_wan14b_h200x2_eager_vs_compiled.json"
    ;;
matrix-a)
    python -m streamdit matrix --backend nccl --row-timeout 60 \
        --only OM-01,OM-02,OM-03,OM-04,OM-05,OM-06,OM-07,OM-08,OM-09,OM-10,OM-11,OM-12,OM-13,X-header,X-leader,X-ids,X-sigterm \
        --json "$OUT/matrix_nccl_a.json" 2>&1 | tee "$OUT/matrix_nccl_a.log"
    ;;
matrix-b)
    python -m streamdit matrix --backend nccl --row-timeout 60 \
        --only C-01,C-02,C-03,C-04,O-01,O-02,O-03 --json "$OUT/matrix_nccl_b.json" 2>&1 | tee "$OUT/matrix_nccl_b.log"
    ;;
emulated-pp)
    export TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC=1000
    printf '%s' '{"entries": [{"chunk": 0, "prompt": "a fox"}, {"chunk": 2, "prompt": "a fox at night", "transition": "soft"}, {"chunk": 4, "prompt": "a harbour", "transition": "cut"}]}' >"$OUT/tl.json"
    DUMP_AT=60 bash bench/emulated_hosts.sh pp 2 100 "$OUT/pp0" --chunks 6 --dist-timeout 15 --metrics "$OUT/pp0/m.jsonl" --log-level INFO
    DUMP_AT=60 bash bench/emulated_hosts.sh pp 3 100 "$OUT/pp1" --chunks 6 --dist-timeout 15 --timeline "$OUT/tl.json" --metrics "$OUT/pp1/m.jsonl"
    tail -n 2 "$OUT"/pp*/rank0.log
    ;;
emulated-matrix-a)  # ~8 min on one H200
    python -m streamdit matrix --backend nccl --emulate-hosts --row-timeout 60 --logs /tmp/logs \
        --only OM-03,OM-04,OM-05,OM-07,OM-08,OM-09,OM-11,OM-12,OM-13,X-leader \
        --json "$OUT/matrix_emulated_a.json" 2>&1 | tee "$OUT/matrix_emulated_a.log"
    tar czf "$OUT/logs_a.tgz" -C /tmp logs
    ;;
emulated-matrix-b)  # ~8 min on one H200
    python -m streamdit matrix --backend nccl --emulate-hosts --row-timeout 60 --logs /tmp/logs \
        --only C-01,C-02,C-03,C-04,O-01,O-02,O-03,X-sigterm \
        --json "$OUT/matrix_emulated_b.json" 2>&1 | tee "$OUT/matrix_emulated_b.log"
    tar czf "$OUT/logs_b.tgz" -C /tmp logs
    ;;
e2e-1gpu)
    python bench/bench_e2e.py --out "$OUT/e2e_wan14b_h200_single.json" --skip 3 --job-timeout 280 \
        --job "eager=${WAN[*]} --chunks 10" --job "compiled=${WAN[*]} --chunks 10 --compile"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
