"""``loss.png``: training loss per step, validation loss and accuracy per epoch, like the book's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(history: list[dict[str, Any]], path: str | Path) -> bool:
    """Write the figure; return False (and write nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen needed; the figure only goes to a file
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss (per step)")
    for key, label in (("train_loss", "train loss (epoch end)"), ("val_loss", "val loss (epoch end)")):
        points = [(r["step"], r[key]) for r in epochs if r.get(key) is not None]
        if points:
            ax_loss.plot(*zip(*points), "o--", label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax_loss.legend()
    # A classifier's accuracy, or a language model's perplexity.
    metric, title = ("acc", "Accuracy") if any("train_acc" in r for r in epochs) else ("ppl", "Perplexity")
    for key, label in ((f"train_{metric}", "train"), (f"val_{metric}", "validation")):
        points = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel=title.lower(), title=title)
    if metric == "acc":
        ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
