"""PNG plots written at the end of a run from its log.jsonl."""
from __future__ import annotations

import os

from adapmtl.train.logging import read_log


def _series(records, prefix):
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(prefix):
                xs, ys = out.setdefault(k[len(prefix):], ([], []))
                xs.append(r["step"])
                ys.append(v)
    return out


def make_plots(out_dir: str, final_layers: dict[str, float] | None = None, target: float | None = None) -> list[str]:
    """sparsity per component over time (with the controller's schedule and the target, when there are),
    task weights over time, per-layer final sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(os.path.join(out_dir, "log.jsonl"))
    records = [r for r in log if r.get("kind") == "train"]
    val_records = [r for r in log if r.get("kind") == "val"]
    written = []
    for name, prefix, ylabel in (("sparsity_components.png", "sparsity/component/", "sparsity"),
                                 ("task_weights.png", "loss_weight/", "adaptive weight w_t"),
                                 ("losses.png", "loss/", "loss (lines: train, dashed: val)")):
        series = _series(records, prefix)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label)
        if prefix == "sparsity/component/":
            overall = _series(records, "sparsity/")
            if "overall" in overall:
                ax.plot(*overall["overall"], "k--", label="overall")
            schedule = _series(records, "control/").get("schedule")
            if schedule:
                ax.plot(*schedule, ":", color="tab:gray", lw=2, label="required (schedule)")
            if target is not None:
                ax.axhline(target, color="tab:red", lw=0.8, label=f"target {target:g}")
        if prefix == "loss/":  # the held-out curve beside the training one, same colour per task
            for i, (label, (xs, ys)) in enumerate(_series(val_records, "val/loss/").items()):
                color = next((ln.get_color() for ln in ax.get_lines() if ln.get_label() == label), f"C{i}")
                ax.plot(xs, ys, "o--", color=color, ms=3, label=f"{label} (val)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if final_layers:
        fig, ax = plt.subplots(figsize=(9, max(3, 0.24 * len(final_layers) + 1)))
        names = list(final_layers)
        ax.barh(range(len(names)), [final_layers[n] for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("final sparsity")
        ax.set_xlim(0, 1)
        fig.tight_layout()
        path = os.path.join(out_dir, "layer_sparsity.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
