#!/bin/bash
# The decode graph's replay time under each NEXTSERVE_* switch setting, one process per setting and the
# settings in turn for each round, on one card (an A/B: compare only within one run of this script).
#
#   bash benchmarks/ab_decode_switches.sh OUT_DIR [LAYERS=48] [BATCH=1] [ROUNDS=2]
#
# OUT_DIR gets summary.json ({setting: [graph_replay_us per round], kernels_per_step}) and each run's
# profile_decode_step JSON in runs.tgz.
set -u
out=$1; layers=${2:-48}; batch=${3:-1}; rounds=${4:-2}
settings=("NEXTSERVE_GDN_DECODE=three" "NEXTSERVE_GDN_DECODE=one" "NEXTSERVE_GDN_DECODE=two"
          "NEXTSERVE_ROUTER_NORM=1" "NEXTSERVE_GDN_DECODE=one NEXTSERVE_ROUTER_NORM=1")
runs=$(mktemp -d)
for round in $(seq 1 "$rounds"); do
  for i in "${!settings[@]}"; do
    echo "=== ${settings[$i]} round $round"
    env ${settings[$i]} python benchmarks/profile_decode_step.py --quantize fp8 --layers "$layers" --batch "$batch" \
      --replays 2 --out "$runs/setting${i}_round${round}.json" > /dev/null 2> "$runs/setting${i}_round${round}.log" \
      || tail -5 "$runs/setting${i}_round${round}.log"
  done
done
python - "$runs" "$out/summary.json" "${settings[@]}" <<'EOF'
import json, sys
from pathlib import Path
runs, out, settings = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
summary = {}
for i, setting in enumerate(settings):
    results = [json.loads(p.read_text()) for p in sorted(runs.glob(f"setting{i}_round*.json"))]
    summary[setting] = dict(graph_replay_us=[r["graph_replay_us"] for r in results],
                            kernels_per_step=[r["kernels_per_step"] for r in results])
first_run = runs / "setting0_round1.json"
first = json.loads(first_run.read_text()) if first_run.exists() else {}
out.write_text(json.dumps(dict(card=first.get("card"), commit=first.get("commit"), settings=summary), indent=1))
print(json.dumps(summary, indent=1))
EOF
tar czf "$out/runs.tgz" -C "$runs" .
