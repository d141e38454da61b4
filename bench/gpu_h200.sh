#!/usr/bin/env bash
# One-GPU (H200) benchmark stages, one per device call (a call is capped at 10 minutes).
#
#   bash bench/gpu_h200.sh text   # issue 16: wan-14b --recipe krea-realtime, hash text vs a
#                                 # umT5-XXL-shaped encoder with random weights (--text-encoder):
#                                 # prompt-change latency (text_ms) and FPS side by side
#
# Wheels missing from the GPU image (PyAV) travel in .whl/; results go to $OUT. perf17a/b run
# a baseline from .base/src (mkdir .base && git archive <previous landing> src | tar -x -C .base;
# carry .base with .whl).
set -u
stage=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
WAN=(--preset wan-14b --device cuda --dtype bfloat16 --height 320 --width 576 --compile)

# issue 17's wan-14b 320x576 table, jobs side by side: the landed default (its code in
# .base/src, a git archive of the previous landing) beside today's default, --fp8 and
# --fp8 --vae tiny, each plain and with a soft prompt change from chunk 1 on.
# $1 the result's name, $2 chunks per job, $3 a job's timeout (s), $4 the default job's name
wan14b_table() {
    local W="${WAN[*]} --chunks $2" S="--timeline bench/soft_stream.json" D=$4
    python bench/bench_e2e.py --out "$OUT/$1" --skip 2 --job-timeout "$3" \
        --src before=.base/src --job "before=$W" --job "$D=$W" --job "$D-soft=$W $S" \
        --job "fp8=$W --fp8" --job "fp8-soft=$W --fp8 $S" --job "fp8-tiny=$W --fp8 --vae tiny" \
        --job "fp8-tiny-soft=$W --fp8 --vae tiny $S"
}

case $stage in
final17)
    wan14b_table e2e_wan14b_h200_final17.json 10 200 bf16
    ;;
soft17)
    # plain beside soft streams, run with an experiment since reverted (Phase B queued once the
    # previous chunk's Phase B ran, not its decode): docs/performance.md, "End to end"; the
    # device budget cut it after its first 3 jobs
    W="${WAN[*]} --chunks 10" S="--timeline bench/soft_stream.json"
    python bench/bench_e2e.py --out "$OUT/e2e_wan14b_h200_soft17.json" --skip 2 --job-timeout 200 \
        --job "fp8-tiny=$W --fp8 --vae tiny" --job "fp8-tiny-soft=$W --fp8 --vae tiny $S" \
        --job "fp8=$W --fp8" --job "fp8-soft=$W --fp8 $S" --job "bf16=$W" --job "bf16-soft=$W $S"
    ;;
graphs17)
    # issue 17: CUDA graphs of the generator's calls; the GPU tests, then the wan-14b table
    timeout 300 python -m pytest -q -p no:cacheprovider tests/unit/test_graphs.py 2>&1 | tail -5
    W="${WAN[*]} --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_wan14b_h200_graphs17.json" --skip 2 --job-timeout 200 \
        --src before=.base/src --job "before=$W" --job "bf16=$W" --job "fp8=$W --fp8" \
        --job "fp8-tiny=$W --fp8 --vae tiny"
    ;;
refill17)
    # issue 17: the text K/V refill of a blend step as a CUDA graph. The GPU tests, a profile of
    # a soft --fp8 stream (every chunk a blend step), then --fp8 plain beside soft
    timeout 300 python -m pytest -q -p no:cacheprovider tests/unit/test_graphs.py 2>&1 | tail -5
    S="--timeline bench/soft_stream.json"
    python bench/profile_stream.py --out "$OUT/profile_wan14b_fp8_soft_h200.json" --timeout 280 \
        --flags "${WAN[*]} --chunks 7 --profile-from 4 --profile-chunks 2 --fp8 $S"
    W="${WAN[*]} --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_wan14b_h200_refill17.json" --skip 2 --job-timeout 200 \
        --job "fp8=$W --fp8" --job "fp8-soft=$W --fp8 $S"
    ;;
tune17b)
    # issue 17, untried: inductor's reduction options against the memory-bound fused kernels
    # (a call's 15.9 ms bf16 / 22.1 ms FP8), per generator call, bf16 then FP8
    V=compile,compile-multi-kernel,compile-no-split
    python bench/bench_generator.py --preset wan-14b --variants $V --profile \
        --out "$OUT/generator_reductions_bf16_h200.json"
    python bench/bench_generator.py --preset wan-14b --variants $V --fp8 --profile \
        --out "$OUT/generator_reductions_fp8_h200.json"
    ;;
norms17)
    # issue 17: the fused norm kernels (model/norm_kernels.py): their GPU tests, then the
    # per-call generator A/B (inductor's kernels vs the fused ones), bf16 then FP8, with
    # inductor's generated code of the bf16 run kept (gzipped)
    timeout 150 python -m pytest -q -p no:cacheprovider --show-capture=no --tb=short \
        tests/unit/test_norm_kernels.py 2>&1 | grep -v "^DEBUG" | tail -30
    V=compile,compile-fused-norms
    TORCH_LOGS=output_code timeout 190 python bench/bench_generator.py --preset wan-14b --profile \
        --variants $V --out "$OUT/generator_norms_bf16_h200.json" \
        2> >(gzip > "$OUT/generator_norms_bf16_output_code.txt.gz") | grep -v '^{'
    timeout 190 python bench/bench_generator.py --preset wan-14b --profile --fp8 \
        --variants $V --out "$OUT/generator_norms_fp8_h200.json" 2>&1 | grep -v '^{' | tail -20
    ;;
final17c)
    # issue 17's table with the fused norm kernels (model/norm_kernels.py, the default on CUDA)
    # beside the landed default (.base/src); their GPU tests and the per-call A/B are `norms17`
    wan14b_table e2e_wan14b_h200_final17c.json 10 200 bf16
    ;;
final17b)
    # issue 17's table again with the text-refill graphs, then the GPU tests (in what is left of
    # the device call's 10 minutes)
    wan14b_table e2e_wan14b_h200_final17b.json 10 200 bf16
    timeout 110 python -m pytest -q -p no:cacheprovider --show-capture=no --tb=short \
        tests/unit/test_graphs.py 2>&1 | grep -v "^DEBUG" | tail -30
    ;;
sf17)
    # issue 17: the GPU tests, then wan-1.3b at 480x832 (Self-Forcing's setting) beside the
    # landed default (.base/src), with the full Wan decoder and with --vae tiny
    timeout 300 python -m pytest -q -p no:cacheprovider -rf tests/unit/test_graphs.py 2>&1 | tail -40
    SF="--preset wan-1.3b --device cuda --dtype bfloat16 --height 480 --width 832 --compile --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_wan13b_480x832_h200_final17.json" --skip 2 --job-timeout 200 \
        --src 1.3b-before=.base/src --job "1.3b-before=$SF" --job "1.3b=$SF" --job "1.3b-tiny=$SF --vae tiny"
    ;;
profile17)
    # issue 17: where the chunk period goes on the device (streamdit run --profile, read back)
    python bench/profile_stream.py --out "$OUT/profile_wan14b_bf16_h200.json" --timeout 280 \
        --flags "${WAN[*]} --chunks 7 --profile-from 4 --profile-chunks 2"
    python bench/profile_stream.py --out "$OUT/profile_wan14b_fp8_tiny_h200.json" --timeout 280 \
        --flags "${WAN[*]} --chunks 7 --profile-from 4 --profile-chunks 2 --fp8 --vae tiny"
    ;;
text)
    python bench/make_random_umt5.py /tmp/umt5-xxl --device cuda | tee "$OUT/umt5_folder.json"
    cat >/tmp/prompts.json <<'TL'
{"entries": [
  {"chunk": 0, "prompt": "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"},
  {"chunk": 5, "prompt": "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29", "transition": "soft"},
  {"chunk": 11, "prompt": "w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41 w42", "transition": "soft"},
  {"chunk": 17, "prompt": "w50 w51 w52 w53 w54 w55 w56 w57", "transition": "hard"}
]}
TL
    common="--recipe krea-realtime ${WAN[*]} --chunks 22 --timeline /tmp/prompts.json"
    python bench/bench_e2e.py --out "$OUT/text_krea_wan14b_h200.json" --skip 2 --job-timeout 280 \
        --job "krea-hash-text=$common" \
        --job "krea-umt5-xxl=$common --text-encoder /tmp/umt5-xxl" \
        --job "krea-umt5-xxl-480x832=${common/--height 320 --width 576/--height 480 --width 832} --text-encoder /tmp/umt5-xxl"
    python bench/bench_text_encode.py --text-encoder /tmp/umt5-xxl --out "$OUT/text_encode_umt5xxl_h200.json"
    python bench/bench_text_encode.py --out "$OUT/text_encode_hash_h200.json"
    ;;
recipes)
    # the other recipes compiled on wan-14b (every loop's CUDA path: Scope's biased attention on
    # every call, Self-Forcing's clean append call and 21-frame window)
    python bench/bench_e2e.py --out "$OUT/recipes_wan14b_h200.json" --skip 2 --job-timeout 200 \
        --job "scope-krea=--recipe scope-krea ${WAN[*]} --chunks 12" \
        --job "self-forcing=--recipe self-forcing ${WAN[*]} --chunks 12" \
        --job "streamdit=--recipe streamdit ${WAN[*]} --chunks 12"
    ;;
kernels)
    # issue 17: attention (plain vs KV-biased) per backend, bf16 vs FP8 linears, matmul peaks
    python bench/bench_kernels.py --out "$OUT/kernels_h200.json"
    ;;
dev17)
    # issue 17, first look: the new default backend and --fp8 on plain and soft-transition streams
    W="${WAN[*]} --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_dev17_h200.json" --skip 2 --job-timeout 200 \
        --job "flash=$W --attn-backend flash" --job "auto=$W" \
        --job "auto-soft=$W --timeline bench/soft_stream.json" \
        --job "fp8=$W --fp8" --job "fp8-soft=$W --fp8 --timeline bench/soft_stream.json"
    ;;
perf17a)
    # issue 17 (an intermediate code step; its run is e2e_wan14b_h200_issue17_run1.json, with
    # a 150 s job timeout then): Phase C's decoders, then the wan-14b jobs
    python bench/bench_vae.py --height 320 --width 576 --out "$OUT/vae_320x576_h200.json"
    wan14b_table e2e_wan14b_h200_issue17.json 12 120 default
    ;;
perf17b)
    # issue 17, the final configuration: decoders at both geometries; wan-14b 320x576 side by
    # side with the landed default (.base/src); wan-1.3b 480x832 (Self-Forcing's setting);
    # the deviation of --fp8 from bf16 over 10 chunks (lossless .npy); the FP8 kernel profile
    python bench/bench_vae.py --height 320 --width 576 --out "$OUT/vae_320x576_h200.json"
    python bench/bench_vae.py --height 480 --width 832 --out "$OUT/vae_480x832_h200.json"
    wan14b_table e2e_wan14b_h200_issue17.json 12 120 default
    SF="--preset wan-1.3b --device cuda --dtype bfloat16 --height 480 --width 832 --compile --chunks 12"
    python bench/bench_e2e.py --out "$OUT/e2e_wan13b_480x832_h200.json" --skip 2 --job-timeout 100 \
        --src 1.3b-before=.base/src --job "1.3b-before=$SF" --job "1.3b=$SF" --job "1.3b-tiny=$SF --vae tiny"
    python bench/bench_e2e.py --out "$OUT/fp8_deviation_wan14b_h200.json" --skip 2 --job-timeout 100 \
        --video-suffix .npy --job "bf16=${WAN[*]} --chunks 10" --job "fp8=${WAN[*]} --chunks 10 --fp8" \
        --compare bf16,fp8
    python bench/bench_generator.py --preset wan-14b --variants compile --fp8 --profile \
        --out "$OUT/generator_fp8_profile_h200.json"
    ;;
tune17)
    # issue 17, second pass: the Wan decoder frame by frame vs batched steps; inductor's
    # kernel tuning (coordinate descent, max-autotune) on the compiled blocks, bf16 and FP8
    python bench/bench_vae.py --height 320 --width 576 --out "$OUT/vae_320x576_batched_h200.json"
    python bench/bench_generator.py --preset wan-14b --variants compile,compile-cdt --profile \
        --out "$OUT/generator_tuning_bf16_h200.json"
    python bench/bench_generator.py --preset wan-14b --variants compile,compile-cdt --fp8 --profile \
        --out "$OUT/generator_tuning_fp8_h200.json"
    python bench/bench_generator.py --preset wan-14b --variants compile-max-autotune --fp8 --profile \
        --out "$OUT/generator_max_autotune_fp8_h200.json"
    ;;
vae17a)
    # issue 17, third pass (a first look, run on an earlier code step: every conv folded, the
    # taps stacked through a cat; vae_320x576_compiled_first_look_h200.json): the Wan decoder
    # eager vs folded time taps vs the compiled decode step, with kernel profiles; one wan-14b
    # job through the compiled decoder
    timeout 380 python bench/bench_vae.py --height 320 --width 576 --profile \
        --variants channels_last,folded,compiled,compiled_folded --out "$OUT/vae_320x576_compiled_h200.json"
    python bench/bench_e2e.py --out "$OUT/e2e_vae17a_smoke.json" --skip 2 --job-timeout 170 \
        --job "compiled-vae=${WAN[*]} --chunks 8"
    ;;
vae17)
    # issue 17, third pass: the Wan decoder eager vs compiled (one graph per decode-step
    # variant), with / without its narrow convs folded into 2-D convs, kernel profiles; then the
    # wan-14b jobs side by side with the landed default (.base/src). The bf16 / fp8 jobs run the
    # faster compiled decoder of this run: this tree (folds) or .variant/src (a copy of it with
    # the fold line of runtime/build.py deleted)
    timeout 300 python bench/bench_vae.py --height 320 --width 576 --profile \
        --variants channels_last,folded,compiled,compiled_folded --out "$OUT/vae_320x576_compiled_h200.json"
    best=$(python -c "import json,sys; r=json.load(open(sys.argv[1]))['ms_per_chunk_of_3_latents']
print('src' if r.get('wan_compiled_folded', 1e9) <= r.get('wan_compiled', 1e9) else '.variant/src')" \
        "$OUT/vae_320x576_compiled_h200.json")
    echo "e2e decoder tree: $best"
    W="${WAN[*]} --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_wan14b_h200_vae17.json" --skip 2 --job-timeout 150 \
        --src before=.base/src --src bf16="$best" --src fp8="$best" \
        --job "before=$W" --job "bf16=$W" --job "fp8=$W --fp8" --job "fp8-tiny=$W --fp8 --vae tiny"
    ;;
vae17b)
    # issue 17, third pass at 480x832 (a call of its own: the cold compile of the decoder at
    # this size took longer than vae17 had left): the decoder eager vs compiled, then wan-1.3b
    # (Self-Forcing's setting) side by side with the landed default (.base/src)
    timeout 260 python bench/bench_vae.py --height 480 --width 832 \
        --variants channels_last,compiled_folded --out "$OUT/vae_480x832_compiled_h200.json"
    SF="--preset wan-1.3b --device cuda --dtype bfloat16 --height 480 --width 832 --compile --chunks 10"
    python bench/bench_e2e.py --out "$OUT/e2e_wan13b_480x832_h200_vae17.json" --skip 2 --job-timeout 240 \
        --src 1.3b-before=.base/src --job "1.3b-before=$SF" --job "1.3b=$SF"
    ;;
vae17c)
    # issue 17: the compiled decoder at 480x832 without the folds, from a cold cache (in vae17b
    # the folded variant's cold compile did not finish in 260 s)
    timeout 200 python bench/bench_vae.py --height 480 --width 832 \
        --variants compiled --out "$OUT/vae_480x832_compiled_nofold_h200.json"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
