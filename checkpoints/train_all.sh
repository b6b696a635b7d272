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
  # A few-shot model trained on the v1 corpus (pseudo-words only) counts as not trained.
  if [[ -f $dir/config.json ]] && grep -q '"finished": true' "$dir/config.json" &&
     ! grep -q '"fewshot-tasks.txt"' "$dir/config.json"; then
    echo "== $name: trained already"; continue
  fi
  recipe=$dir/recipe.toml
  if [[ $name == fewshot-* ]]; then
    # The issue-13 corpus: real words, random strings, 1,668 tasks (recipe-v2.toml until
    # the model is retrained on it, then recipe.toml).
    [[ -f $dir/recipe-v2.toml ]] && recipe=$dir/recipe-v2.toml
    [[ -f runs/fewshot-tasks-v2.txt ]] ||
      lm make-tasks --out runs/fewshot-tasks-v2.txt --episodes 300000 --seed 1234 --version 2
  fi
  resume=()
  [[ -f $dir/train_state.pt ]] && resume=(--resume)
  echo "== $name"
  lm train --config "$recipe" --no-progress "${resume[@]}"
done
