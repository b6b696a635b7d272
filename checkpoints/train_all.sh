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
    # The newest versioned recipe (recipe-v3.toml) until the model is retrained by it and it
    # becomes recipe.toml; the task corpus it names is made first (lm make-tasks --version).
    for v in 3 2; do
      if [[ -f $dir/recipe-v$v.toml ]]; then recipe=$dir/recipe-v$v.toml; break; fi
    done
    version=$(grep -o 'fewshot-tasks-v[0-9]*\.txt' "$recipe" | head -1 | tr -dc 0-9)
    # and its answer mask (lm train --loss-mask), made with it
    episodes=300000  # 500,000 from version 5 on, as tests/test_shipped_checkpoints.py
    if [[ $version -ge 5 ]]; then episodes=500000; fi
    [[ -f runs/fewshot-tasks-v$version.txt && -f runs/fewshot-tasks-v$version.mask ]] ||
      lm make-tasks --out runs/fewshot-tasks-v$version.txt --episodes "$episodes" --seed 1234 \
        --version "$version" --mask runs/fewshot-tasks-v$version.mask
  fi
  # Resume a run interrupted in the recipe's out directory (relative to the recipe).
  out=$(sed -n 's/^out = "\(.*\)".*/\1/p' "$recipe")
  resume=()
  [[ -f $(dirname "$recipe")/$out/train_state.pt ]] && resume=(--resume)
  echo "== $name"
  lm train --config "$recipe" --no-progress "${resume[@]}"
done
