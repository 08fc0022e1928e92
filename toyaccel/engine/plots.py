"""``loss.png``: training loss per step, validation loss and accuracy per epoch, like the book's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Train and validation curves often coincide (both at accuracy 1.0): a large hollow marker under a small
# filled one on a dashed line keeps both visible where they overlap.
EPOCH_STYLES = (
    {"marker": "o", "markersize": 9, "markerfacecolor": "none", "linestyle": "-", "linewidth": 2.5, "alpha": 0.8},
    {"marker": "s", "markersize": 4, "linestyle": "--", "linewidth": 1.2},
)


def plot_metrics(history: list[dict[str, Any]], path: str | Path) -> bool:
    """Write the figure; return False (and write nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen needed; the figure only goes to a file
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    evaluations = [r for r in history if r.get("kind") in ("epoch", "eval")]  # --eval-every-steps: kind "eval"
    # --eval-every-steps: the run evaluates every K steps, and its epoch records carry no figures.
    by_step = any(r.get("kind") == "eval" for r in evaluations)
    when = "every K steps" if by_step else "epoch end"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss (per step)")
    for key, label, style in (("train_loss", f"train loss ({when})", EPOCH_STYLES[0]),
                              ("val_loss", f"val loss ({when})", EPOCH_STYLES[1])):  # fmt: skip
        points = [(r["step"], r[key]) for r in evaluations if r.get(key) is not None]
        if points:
            ax_loss.plot(*zip(*points), label=label, **style)
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax_loss.legend()
    # A classifier's accuracy, or a language model's perplexity: per epoch, or per step.
    scored, x, x_label = (evaluations, "step", "optimizer step") if by_step else (epochs, "epoch", "epoch")
    metric, title = ("acc", "Accuracy") if any("train_acc" in r for r in scored) else ("ppl", "Perplexity")
    for key, label, style in ((f"train_{metric}", "train", EPOCH_STYLES[0]),
                              (f"val_{metric}", "validation", EPOCH_STYLES[1])):  # fmt: skip
        points = [(r[x], r[key]) for r in scored if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), label=label, **style)
    ax_acc.set(xlabel=x_label, ylabel=title.lower(), title=title)
    if metric == "acc":
        ax_acc.set_ylim(-0.05, 1.05)
    if ax_acc.get_legend_handles_labels()[0]:  # an empty legend is a warning on every run without figures
        ax_acc.legend()
    for axis in (ax_loss.xaxis, ax_acc.xaxis):  # steps and epochs are whole numbers: no tick at 1.5
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
