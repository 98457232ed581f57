#!/usr/bin/env bash
# From a fresh clone to a synthesized wav, offline, on a CPU:
#   set up .venv -> quantize + phonemize a copy of data/test -> train the AR and the NAR
#   (config/test) -> export both -> synthesize.
# What comes out is a tiny model overfitting two utterances, decoded by an UNTRAINED codec:
# it proves the pipeline end to end; it is not speech. See README "Real results".
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1

work=data/quickstart
rm -rf "$work"
mkdir -p "$work/test"
cp data/test/*.wav data/test/*.normalized.txt "$work/test/"

echo "== 1/5 quantize audio and phonemize text"
$PY -m vall_e.emb.qnt "$work" codec_weights=untrained device=cpu
$PY -m vall_e.emb.g2p "$work"

echo "== 2/5 train the AR (config/test/ar.yml)"
rm -rf ckpts/test/ar ckpts/test/nar
$PY -m vall_e.train yaml=config/test/ar.yml "data_dirs=[$work]" device=cpu </dev/null
echo "== 3/5 train the NAR (config/test/nar.yml)"
$PY -m vall_e.train yaml=config/test/nar.yml "data_dirs=[$work]" device=cpu </dev/null

echo "== 4/5 export"
$PY -m vall_e.export zoo/test/ar.pt yaml=config/test/ar.yml
$PY -m vall_e.export zoo/test/nar.pt yaml=config/test/nar.yml

echo "== 5/5 synthesize"
mkdir -p out
$PY -m vall_e "$(cat data/test/test.normalized.txt)" data/test/test2.wav out/quickstart.wav \
  --ar-ckpt zoo/test/ar.pt --nar-ckpt zoo/test/nar.pt --device cpu --seed 0 --max-ar-steps 600 codec_weights=untrained
