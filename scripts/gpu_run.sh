#!/usr/bin/env bash
# Training on the GPU machine in time-budgeted slices (docs/gpu_recipe.md).
#
# Here (the CPU machine, with the runtime):
#   scripts/gpu_run.sh split [MODEL.gguf]        model -> runs/gpu/a/model.part_a (52 MB), runs/gpu/b/model.part_b,
#                                                runs/gpu/b/model.sha256, the gguf wheel in runs/gpu/b/
#   scripts/gpu_run.sh prepare CONFIG [MODEL]    pre-tokenized data -> runs/gpu/b/data.json.gz
#   scripts/gpu_run.sh save NAME DIR             the checkpoint brought back (DIR/NAME.ckpt.pt) -> gpu/NAME/, in
#                                                parts of at most 1000 KiB (git add them)
# There (the GPU machine; runs/ is ignored by git, so each run names its folder in `carry`):
#   run 1, carry runs/gpu/a:  scripts/gpu_run.sh part-a
#   run 2, carry runs/gpu/b:  scripts/gpu_run.sh train NAME CONFIG BUDGET_S [gpu_train.py train options]
#                             scripts/gpu_run.sh check [gpu_check.py options]   (after train, or instead of it)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DEFAULT="$HOME/.cache/first-gguf/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PART_A_BYTES=52000000   # each run carries its part + the working tree (8.4 MB now) + the rest: < 64 MiB
M=${GPU_M:-/root/m}        # where the model is put together on the GPU machine (kept while the machine stays warm)
PY=${PY:-python3}

die() { echo "gpu_run.sh: $*" >&2; exit 1; }

assemble() {  # the model from part_a (run 1) and part_b (this run), checked against the sha256 made here
    [ -f "$M/model.part_a" ] || die "$M/model.part_a missing: run 'scripts/gpu_run.sh part-a' (carry runs/gpu/a) first"
    local sums; sums="$(pwd)/runs/gpu/b/model.sha256"
    if [ ! -f "$M/model.gguf" ] || ! (cd "$M" && sha256sum -c --status "$sums"); then
        cat "$M/model.part_a" runs/gpu/b/model.part_b > "$M/model.gguf"
        (cd "$M" && sha256sum -c "$sums") || die "model.gguf: sha256 differs (part_a of another model? run part-a again)"
    fi
    if ! $PY -c "import gguf" 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --target /tmp/site runs/gpu/b/gguf-*.whl
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

cmd=${1:-}; shift || true
case "$cmd" in
split)
    model=${1:-$MODEL_DEFAULT}
    [ -f "$model" ] || die "model not found: $model"
    mkdir -p runs/gpu/a runs/gpu/b
    head -c $PART_A_BYTES "$model" > runs/gpu/a/model.part_a
    tail -c +$((PART_A_BYTES + 1)) "$model" > runs/gpu/b/model.part_b
    (cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | sed 's/  .*/  model.gguf/' > runs/gpu/b/model.sha256
    ls runs/gpu/b/gguf-*.whl >/dev/null 2>&1 || .venv/bin/python -m pip download -q --no-deps -d runs/gpu/b gguf==0.19.0
    du -b runs/gpu/a/* runs/gpu/b/*
    ;;
prepare)
    [ $# -ge 1 ] || die "usage: prepare CONFIG [MODEL]"
    mkdir -p runs/gpu/b
    .venv/bin/python scripts/gpu_train.py prepare --config "$1" --model "${2:-$MODEL_DEFAULT}" -o runs/gpu/b/data.json.gz
    ;;
save)
    [ $# -eq 2 ] || die "usage: save NAME DIR (DIR holds NAME.ckpt.pt, e.g. the run's files_at)"
    name=$1; src="$2/$name.ckpt.pt"
    [ -f "$src" ] || die "no checkpoint $src"
    .venv/bin/python -c "import sys; from first_gguf.train.checkpoint import checkpoint_meta, read_checkpoint as r; m = checkpoint_meta(r(sys.argv[1])); print('step', m['step'], 'format', m['format'])" "$src"
    mkdir -p "gpu/$name"
    rm -f "gpu/$name/$name.ckpt.pt".*
    split -b 1000k -d "$src" "gpu/$name/$name.ckpt.pt."
    for f in "$2/$name.log" "$2/gpu_check.json"; do [ -f "$f" ] && cp "$f" "gpu/$name/"; done
    ls -la "gpu/$name"
    echo "now: git add gpu/$name && git commit -m '...'"
    ;;
part-a)
    mkdir -p $M && cp runs/gpu/a/model.part_a $M/ && ls -la $M
    ;;
train)
    [ $# -ge 3 ] || die "usage: train NAME CONFIG BUDGET_S [gpu_train.py train options]"
    name=$1 config=$2 budget=$3; shift 3
    assemble
    out=${OUT:-runs/gpu/out}; mkdir -p "$out"
    resume=()
    if ls "gpu/$name/$name.ckpt.pt".* >/dev/null 2>&1; then
        cat "gpu/$name/$name.ckpt.pt".* > "/tmp/$name.ckpt.pt"
        resume=(--resume-from "/tmp/$name.ckpt.pt")
    fi
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
    $PY scripts/gpu_train.py train --config "$config" --data runs/gpu/b/data.json.gz --model $M/model.gguf \
        -o "$out/$name.safetensors" --time-budget "$budget" --device "${DEVICE:-cuda}" "${resume[@]}" "$@" 2>&1 \
        | grep --line-buffered -v "Converting and de-quantizing\|Loading weights" | tee "$out/$name.log"
    ls -la "$out"
    ;;
check)
    assemble
    out=${OUT:-runs/gpu/out}; mkdir -p "$out"
    $PY scripts/gpu_check.py --device "${DEVICE:-cuda}" --model $M/model.gguf --prompts runs/gpu/b/data.json.gz \
        --report "$out/gpu_check.json" "$@" 2>&1 | grep --line-buffered -v "Converting and de-quantizing\|Loading weights"
    ;;
*)
    sed -n '2,16p' "$0"; exit 2
    ;;
esac
