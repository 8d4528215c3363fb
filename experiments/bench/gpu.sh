#!/usr/bin/env bash
# The GPU measurements of experiments/RESULTS.md ("Speed on an H200"), in one go:
#   experiments/bench/gpu.sh OUTDIR [STEPS]
# STEPS (default ops,bench,before,profile,iprofile,tests):
#   ops     per-layer transposed-conv and max-pool forms against PyTorch (ops.py)
#   convs   FCN-8s's convolutions, per layer, in each form against PyTorch
#   bench   the four shared networks at paper size, bfloat16, against PyTorch
#   before  FCN-8s and U-Net again with --plain_gradients (JAX's own gradients)
#   profile FCN-8s and U-Net train steps' kernels (step_profile.py; after bench, its
#           compiled steps come from the persistent compilation cache; with
#           each program's HLO text, to look the kernels' instructions up)
#   iprofile FCN-8s's inference kernels (step_profile.py --infer)
#   fp32    the four shared networks at paper size, float32
#   tests   the layer tests of the GPU rules (transposed and atrous convs, patches,
#           pools and unpooling, resizing) on the GPU
# Each step has its own time limit and writes OUTDIR/<step>.{log,json,md}; a
# failing step does not stop the others. SIZES, BATCH, REPEATS, MODELS (bench,
# fp32), OPS_MODELS and OPS (ops), PROFILE_MODELS, IPROFILE_MODELS and PYTHON
# override the defaults (a CPU dry run:
# SIZES=64 BATCH=1 REPEATS=2 PROFILE_DEVICE=/host:CPU).
set -u
out=${1:?usage: gpu.sh OUTDIR [STEPS]}
steps=${2:-ops,bench,before,profile,iprofile,tests}
sizes=${SIZES:-paper}
batch=${BATCH:-8}
repeats=${REPEATS:-15}
models=${MODELS:-fcn8s,segnet,unet,pspnet}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/semseg_gpu_xla_cache}

run() {  # name limit_s command...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s"
  grep '^|' "$out/$name.log" | tail -n 40
  grep -v '^|' "$out/$name.log" | tail -n 3
}

bench_step() {  # name limit models dtype [more bench.py flags]
  local name=$1 limit=$2 nets=$3 dtype=$4
  shift 4
  run "$name" "$limit" $py experiments/bench/bench.py --models="$nets" \
    --sizes="$sizes" --batch="$batch" --dtype="$dtype" --torch --malloc=default \
    --repeats="$repeats" --warmup=3 --out="$out/$name" "$@"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv >"$out/gpu.txt" 2>&1 && cat "$out/gpu.txt"
$py -c 'import jax, flax, sys; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, jax.devices())' 2>&1 | tail -n 1
case ",$steps," in *,ops,*)
  run ops 110 $py experiments/bench/ops.py \
    --models="${OPS_MODELS:-fcn8s,unet}" --ops="${OPS:-conv_transpose,max_pool}" \
    --sizes="$sizes" --batch="$batch" --dtype=bfloat16 --torch \
    --repeats=10 --warmup=2 --out="$out/ops" ;;
esac
case ",$steps," in *,convs,*)
  run convs 120 $py experiments/bench/ops.py --models=fcn8s --ops=conv \
    --sizes="$sizes" --batch="$batch" --dtype=bfloat16 --torch \
    --repeats=5 --warmup=2 --out="$out/convs" ;;
esac
case ",$steps," in *,bench,*) bench_step bench 240 "$models" bfloat16 ;; esac
case ",$steps," in *,before,*)
  bench_step before 110 fcn8s,unet bfloat16 --plain_gradients ;;
esac
case ",$steps," in *,profile,*)
  run profile 120 $py experiments/bench/step_profile.py \
    --models="${PROFILE_MODELS:-fcn8s,unet}" \
    --sizes="$sizes" --batch="$batch" --dtype=bfloat16 --lines=4 \
    --device="${PROFILE_DEVICE:-/device:GPU}" --out="$out/profile" ;;
esac
case ",$steps," in *,iprofile,*)
  run iprofile 60 $py experiments/bench/step_profile.py --infer \
    --models="${IPROFILE_MODELS:-fcn8s}" \
    --sizes="$sizes" --batch="$batch" --dtype=bfloat16 --lines=4 \
    --device="${PROFILE_DEVICE:-/device:GPU}" --out="$out/iprofile" ;;
esac
case ",$steps," in *,fp32,*) bench_step fp32 240 "$models" float32 ;; esac
case ",$steps," in *,tests,*)
  run tests 200 $py -m pytest -q -p no:cacheprovider tests/test_layers.py \
    -k 'conv_transpose or pool or atrous or wide or patches or resize' ;;
esac
