#!/usr/bin/env python3
"""Writes an offline run with the official W&B Python SDK, for sipt-wandb's reader check.

Usage: make_reference_run.py ROOT
Creates ROOT/wandb/offline-run-*-sdkref01/run-sdkref01.wandb: config with a 100 kB
string (so records cross 32 KiB blocks), five history rows at steps 0, 10, ..., 40 and
exit code 3.  Needs no network (WANDB_MODE=offline).
"""
import os
import sys

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

import wandb  # noqa: E402

root = sys.argv[1]
run = wandb.init(
    dir=root,
    project="ref-proj",
    entity="ref-ent",
    id="sdkref01",
    name="reference",
    tags=["ref", "sdk"],
    config={"lr": 0.5, "nested": {"a": 1}, "blob": "x" * 100_000},
)
for i in range(5):
    run.log({"loss": 1.0 / (i + 1), "acc": i / 4}, step=i * 10)
run.finish(exit_code=3)
