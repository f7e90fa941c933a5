#!/usr/bin/env bash
# The evaluations behind accuracy.md / accuracy.png (run from the repository root after train.sh):
# exact kNN memory attention, k = 32, bf16 memory, through enable_memory(topk=32); the baseline
# sees its last 512 tokens. 4M and 16M: the memory sharded over 4 gloo ranks on this machine
# (enable_memory(process_group=...), 1/4 of the memory per rank; 16M needs ~21 GiB of RAM).
set -euo pipefail
S=benchmarks/dictionary_lookup.py
R=${R:-benchmarks/results/dictionary_lookup}
W=${W:-runs/dictionary_lookup}  # train.sh's stage checkpoints
Q=${Q:-500}
for m in 4096 16384 65536 262144 1048576; do
  for v in fot no_negatives baseline; do
    python $S eval --checkpoint $R/$v --memory-tokens $m --queries $Q --json $R/eval/${v}_$m.json
  done
  python $S eval --checkpoint $W/fot_a --label "fot, plain data (stage fot_a)" --memory-tokens $m --queries $Q \
    --json $R/eval/fot_plain_$m.json
  python $S eval --checkpoint $W/nn_a --label "no-negatives, plain data (stage nn_a)" --memory-tokens $m --queries $Q \
    --json $R/eval/no_negatives_plain_$m.json
done
for m in 4194304 16777216; do
  python $S eval --checkpoint $R/fot --memory-tokens $m --queries ${Q_SHARDED:-250} --ranks 4 --json $R/eval/fot_${m}_4ranks.json
done
python $S report --results $R
