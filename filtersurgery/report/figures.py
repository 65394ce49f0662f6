"""Result reporting for runs: accuracy-per-step plots and markdown tables."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping


def accuracy_per_step(results: Mapping[str, List[Dict]], path) -> Path:
    """Plot test accuracy (mean ± std over seeds) per step, one line per method, as PNG.

    ``results[method]`` is a list of ``{"step", "test_acc_mean", "test_acc_std"}`` rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in results.items():
        st = [r["step"] for r in rows]
        mu = [r["test_acc_mean"] for r in rows]
        sd = [r.get("test_acc_std", 0.0) for r in rows]
        ax.errorbar(st, mu, yerr=sd, marker="o", capsize=3, label=method)
    ax.set_xlabel("step (data part)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r["step"] for rows in results.values() for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` (parent folders created), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(results: Mapping[str, List[Dict]], extra: Mapping[str, Dict] | None = None) -> str:
    """``| method | step 1 | step 2 | ... |`` with ``mean ± std`` cells."""
    steps = sorted({r["step"] for rows in results.values() for r in rows})
    head = "| method | " + " | ".join(f"step {s}" for s in steps) + " |"
    lines = [head, "|" + "---|" * (len(steps) + 1)]
    for m, rows in results.items():
        by = {r["step"]: r for r in rows}
        cells = [f"{by[s]['test_acc_mean']:.2f} ± {by[s].get('test_acc_std', 0):.2f}" if s in by else "" for s in steps]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
