#!/bin/bash
# N streamdit ranks on ONE GPU, each its own emulated host: real NCCL communicators (over
# loopback sockets: no NVLink, no shared memory) on a machine with fewer GPUs than ranks.
# It checks the NCCL path's protocol, stream and thread behaviour, not its speed.
#
#   bash bench/emulated_hosts.sh TOPOLOGY NPROC TIMEOUT_S OUTDIR [streamdit run flags...]
#   e.g. bash bench/emulated_hosts.sh pp 2 100 $OUT/pp0 --chunks 6 --metrics $OUT/pp0/m.jsonl
#
# Every rank's log goes to OUTDIR/rankR.log; DUMP_AT=S sends SIGUSR1 (every thread's Python
# stack) to every rank S seconds in; a rank still alive at TIMEOUT_S gets SIGUSR1, then SIGKILL
# 5 s later. Prints each rank's exit code and when it ended. Run from the repository root.
set -u
topo=$1 n=$2 limit=$3 out=$4
shift 4
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
pids=()
for r in $(seq 0 $((n - 1))); do
  RANK=$r WORLD_SIZE=$n LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    NCCL_HOSTID=streamdit-emulated-host-$r NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 \
    timeout -s USR1 -k 5 "$limit" python -m streamdit run --topology "$topo" --device cuda \
    --no-progress --out "$out/v.mp4" "$@" >"$out/rank$r.log" 2>&1 &
  pids+=($!)
done
SECONDS=0
if [ -n "${DUMP_AT:-}" ]; then (sleep "$DUMP_AT"; pkill -USR1 -f "^python -m streamdit run") & fi
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  echo "rank$i exit $? at ${SECONDS} s"
done
pkill -9 -f "^python -m streamdit run --topology $topo" 2>/dev/null
true
