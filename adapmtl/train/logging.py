"""Run logs: JSONL (one record per logging step), a long-format CSV of the same scalars
(step, tag, value) and TensorBoard scalars. Only rank 0 writes."""
from __future__ import annotations

import csv
import json
import math
import os


class RunLogger:
    def __init__(self, out_dir: str, tensorboard: bool = True, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        mode = "a" if resume else "w"
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), mode)
        self.csv_fh = open(os.path.join(out_dir, "log.csv"), mode, newline="")
        self.csv = csv.writer(self.csv_fh)
        if not resume or self.csv_fh.tell() == 0:
            self.csv.writerow(["step", "tag", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional at run time: the JSONL/CSV hold the same data
                self.writer = None

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            self.csv.writerow([step, k, repr(v)])
            if self.writer is not None:
                self.writer.add_scalar(k, v, step)
        self.csv_fh.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.csv_fh.close()
        if self.writer is not None:
            self.writer.close()


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
