#!/usr/bin/env bash
# Train every shipped checkpoint that is not trained yet, one after another (they share the
# CPU), resuming any that was interrupted. Usage: bash checkpoints/train_all.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(shakespeare-char-gpt shakespeare-char-lstm shakespeare-word-lstm
                                   shakespeare-bpe-gpt fewshot-char-gpt fewshot-char-lstm)
for name in "${names[@]}"; do
  dir="checkpoints/$name"
  if [[ -f $dir/config.json ]] && grep -q '"finished": true' "$dir/config.json"; then
    echo "== $name: trained already"; continue
  fi
  if [[ $name == fewshot-* && ! -f runs/fewshot-tasks.txt ]]; then
    lm make-tasks --out runs/fewshot-tasks.txt --episodes 60000 --seed 1234
  fi
  resume=()
  [[ -f $dir/train_state.pt ]] && resume=(--resume)
  echo "== $name"
  lm train --config "$dir/recipe.toml" --no-progress "${resume[@]}"
done
