"""Where a pipeline run's time went, per stage: wall time, compile, steps/s, device idleness.

    python -m ocl_jax.tools.stage_times WORKDIR [--process_seconds=S] [--out=F.json] [--table=F.md]

Reads the markers the pipeline leaves (WORKDIR/<stage>/stage_done.json, with each training
stage's WORKDIR/<stage>/train_timing.json folded in): per stage its wall time and, for
training stages, the first step's time (it compiles the step), the steady steps/s after it
and the share of that time the devices waited for the host (device_idle_fraction). With
--process_seconds (the whole process, timed outside it) the table also shows what the stages
do not cover: start-up, imports and the dataset's first rendering.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def collect(workdir: str) -> list[dict[str, Any]]:
  """One row per finished stage, in the run's stage order."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{workdir} has no config.json: not a pipeline workdir")
  with open(config_path) as f:
    stages = json.load(f).get("pipeline", {}).get("stages", [])
  rows = []
  for stage in stages:
    marker = os.path.join(workdir, stage, "stage_done.json")
    if not os.path.exists(marker):
      continue
    with open(marker) as f:
      info = json.load(f)
    timing = info.get("timing") or {}
    rows.append(
        {
            "stage": stage,
            "seconds": info.get("seconds"),
            "steps": timing.get("steps", info.get("steps")),
            "first_step_seconds": timing.get("first_step_seconds"),
            "steps_per_second": timing.get("steps_per_second"),
            "device_idle_fraction": timing.get("device_idle_fraction"),
            "platform": timing.get("platform"),
            "devices": timing.get("devices"),
        }
    )
  return rows


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], process_seconds: float | None = None) -> str:
  lines = [
      "| stage | wall s | steps | first step s (compiles) | steps/s after it | device idle |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['stage']} | {_fmt(r['seconds'], '.1f')} | {_fmt(r['steps'], 'd')} | "
        f"{_fmt(r['first_step_seconds'], '.1f')} | {_fmt(r['steps_per_second'], '.2f')} | "
        f"{_fmt(r['device_idle_fraction'], '.2f')} |"
    )
  staged = sum(r["seconds"] or 0.0 for r in rows)
  lines.append(f"| stages together | {staged:.1f} | | | | |")
  if process_seconds is not None:
    lines.append(f"| whole process | {process_seconds:.1f} | | | | |")
    lines.append(f"| outside the stages | {process_seconds - staged:.1f} | | | | |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir")
  p.add_argument("--process_seconds", type=float, default=None)
  p.add_argument("--out", default="", help="also write the rows as JSON here")
  p.add_argument("--table", default="", help="also write the Markdown table here")
  args = p.parse_args(argv)
  rows = collect(args.workdir)
  text = table(rows, args.process_seconds)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "process_seconds": args.process_seconds}, f, indent=1)
  if args.table:
    with open(args.table, "w") as f:
      f.write(text + "\n")
  print(text)
  return text


if __name__ == "__main__":
  main(sys.argv[1:])
