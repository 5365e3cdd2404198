"""Run logs: JSONL (one record per logging step), a long-format CSV of the same scalars
(step, tag, value) and TensorBoard scalars. Only rank 0 writes."""
from __future__ import annotations

import csv
import json
import math
import os


class RunLogger:
    """`resume_step`: continue the logs of a run resumed from that iteration's checkpoint. Records after it
    (written before a kill, and about to be written again) are cut from the JSONL and CSV files, and
    TensorBoard purges its events after it, so every step is logged once."""

    def __init__(self, out_dir: str, tensorboard: bool = True, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        jsonl_path, csv_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "log.csv")
        if resume_step is not None:
            _truncate_jsonl(jsonl_path, resume_step)
            _truncate_csv(csv_path, resume_step)
        mode = "a" if resume_step is not None else "w"
        self.jsonl = open(jsonl_path, mode)
        self.csv_fh = open(csv_path, mode, newline="")
        self.csv = csv.writer(self.csv_fh)
        if resume_step is None or self.csv_fh.tell() == 0:
            self.csv.writerow(["step", "tag", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)
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


def _rewrite(path: str, lines: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def _truncate_jsonl(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    _rewrite(path, kept)


def _truncate_csv(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, newline="") as fh:
        for i, line in enumerate(fh):
            head = line.split(",", 1)[0]
            if i == 0 and head == "step":
                kept.append(line)
            elif head.isdigit() and int(head) <= step and line.endswith("\n"):
                kept.append(line)
    _rewrite(path, kept)


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
