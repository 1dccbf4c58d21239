"""Measure recipes/train.py's DPO on one process and on two (accelerate launch, CPU, gloo).

    python tools/measure_launch.py            # writes benchmarks/launch.json

The course's tiny SFT model and preference pairs, 20 updates of 32 pairs: one process with a batch
of 32, then two processes with 16 each (the same global batch). It records each run's wall time
and the largest relative difference between their logged losses and gradient norms, for the book
page "When one GPU is not enough". Run it with nothing else running.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "launch.json"
STEPS, BATCH = 20, 32


def run(per_device: int, launcher: list[str], log: Path) -> tuple[float, list[dict], int]:
    cmd = [*launcher, str(ROOT / "recipes" / "train.py"), "dpo", "--max-steps", str(STEPS)]
    cmd += ["--per-device-batch-size", str(per_device), "--log-json", str(log)]
    env = {**os.environ, "COURSE_PROFILE": "tiny", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    record = json.loads(log.read_text())
    return seconds, [h for h in record["log"] if "loss" in h], record["world_size"]


def main() -> int:
    import torch

    from utils.artifacts import get_preference_data, get_sft_model

    get_sft_model(show_progress=False), get_preference_data(show_progress=False)  # built before timing
    config = ROOT / "recipes" / "accelerate" / "two_processes.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        one = run(BATCH, [sys.executable], Path(tmp) / "one.json")
        two = run(
            BATCH // 2,
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)],
            Path(tmp) / "two.json",
        )
    worst = {
        key: max(abs(b[key] - a[key]) / max(abs(a[key]), 1e-12) for a, b in zip(one[1], two[1]))
        for key in ("loss", "grad_norm")
    }
    record = {
        "what": f"recipes/train.py dpo on the tiny profile: {STEPS} updates of {BATCH} pairs",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "one_process": {
            "world_size": one[2],
            "per_device_batch": BATCH,
            "wall_s": round(one[0], 1),
            "final_loss": one[1][-1]["loss"],
        },
        "two_processes": {
            "world_size": two[2],
            "per_device_batch": BATCH // 2,
            "wall_s": round(two[0], 1),
            "final_loss": two[1][-1]["loss"],
        },
        "max_relative_difference": worst,
        "steps_compared": min(len(one[1]), len(two[1])),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
