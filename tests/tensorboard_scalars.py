#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with the real `tensorboard` package (its own
EventAccumulator, which also applies the purge of a resumed run's SessionLog START) and prints
every scalar series as JSON: {tag: [[step, value], ...]}."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
