"""The one-shot GPU suite's dry run: the same steps on the CPU with a tiny model, so the
script that a lent GPU runs once is known to work before it gets there."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    launches = json.loads((tmp_path / "step_launches_dry.json").read_text())
    eager, compiled = launches["variants"]["eager"]["per_step"], launches["variants"]["compile"]["per_step"]
    assert compiled["Torch-Compiled Region"] == 1          # the whole step is one compiled graph
    assert eager["Torch-Compiled Region"] == 0 and eager["aten_ops_in_step"] > compiled["aten_ops_in_step"]
    latency = json.loads((tmp_path / "latency_dry_suite.json").read_text())
    case = latency["cases"][0]
    assert set(case["variants"]) == {"eager"} and case["reference"]["tokens_ms"]["p50"] > 0
    slots = json.loads((tmp_path / "slot_ladder_dry.json").read_text())["variants"]
    assert slots["eager"]["warm"] == [] and slots["eager"]["ladders"]["rows"] is None      # exact shapes
    assert [w["rows"] for w in slots["compile"]["warm"]] == [2, 1]                        # its ladder, at start-up
