#!/usr/bin/env bash
# The transcript of docs/zoo-transcript.md: a timm model and a Hugging Face folder analysed end to
# end from the shell. Run from the repository root in an environment with timm and transformers:
#   PYTHON=/path/to/venv/bin/python benchmarks/zoo_transcript.sh [WORKDIR] > docs/zoo-transcript.txt 2>&1
set -euo pipefail
PYTHON=${PYTHON:-python}
W=${1:-/tmp/modlens-zoo-demo}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
modlens() { "$PYTHON" -m modlens.cli "$@"; }
run() { echo "\$ $*"; "$@"; echo; }
if [ ! -f "$W/vit-digits/config.json" ]; then  # the models take minutes to train; made once
  rm -rf "$W"
  run "$PYTHON" benchmarks/zoo_transcript_setup.py "$W"
fi
rm -rf "$W/results"
# timm's config of resnet10t says 176 px crops; this one was trained on the 32 px digits
run modlens analyze timm:resnet10t --model-arg num_classes=10 --weights "$W/resnet10t-digits.safetensors" \
    --test-data "$W/digits/val" --activation-data "$W/digits/val" --per-class 20 --activation-per-class 15 \
    --image-size 32 --resize 32 --n-clusters 8 --n-random 4 --partitionings weights/global activations/global --out "$W/results/timm"
run modlens analyze "hf:$W/vit-digits" --test-data "$W/digits/val" --activation-data "$W/digits/val" \
    --per-class 20 --activation-per-class 15 --n-clusters 8 --n-random 4 --partitionings weights/global activations/global --out "$W/results/hf"
run modlens report "$W/results/timm"
run modlens report "$W/results/hf"
echo "\$ python -c 'import json; print(json.load(open(\"$W/results/timm/manifest.json\"))[\"models\"][0][\"source\"])'"
"$PYTHON" -c "import json, pprint; pprint.pprint(json.load(open('$W/results/timm/manifest.json'))['models'][0]['source'], width=110)"
for r in timm hf; do  # the test accuracy and the data options each run used
  echo "\$ python -c 'import json; m = json.load(open(\"$W/results/$r/manifest.json\")); print(round(m[\"config\"][\"test_accuracy\"], 3), m[\"models\"][0][\"dataset\"][\"files\"][\"options\"])'"
  "$PYTHON" -c "import json; m = json.load(open('$W/results/$r/manifest.json')); print(round(m['config']['test_accuracy'], 3), m['models'][0]['dataset']['files']['options'])"
done
