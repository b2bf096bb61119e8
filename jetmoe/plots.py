"""The training figures `jetmoe train` and scripts/model_card.py draw: loss curves and the expert-load map."""

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, none is assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SMOOTHING = 25  # steps in the running mean of a training curve (one batch's loss is noisy)
COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:red"]
CURVE_KEYS = ["steps", "train_loss", "eval_steps", "validation_loss"]  # what plot_loss_curves reads of a log


def plot_loss_curves(runs, path, title):
    """runs: [(label, train_log)], each log with steps, train_loss, eval_steps and validation_loss (0-based steps,
    as `jetmoe train` writes them) -> a PNG at path: each run's smoothed training loss and its validation loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, log), color in zip(runs, COLORS):
        steps, train = np.array(log["steps"]) + 1, np.array(log["train_loss"])
        prefix = f"{label}: " if len(runs) > 1 else ""
        if len(runs) == 1:
            ax.plot(steps, train, color=color, alpha=0.25, lw=0.8, label="training batch")
        if len(train) >= SMOOTHING:
            smooth = np.convolve(train, np.ones(SMOOTHING) / SMOOTHING, mode="valid")
            ax.plot(steps[SMOOTHING - 1:], smooth, color=color, label=f"{prefix}training ({SMOOTHING}-step mean)")
        ax.plot(np.array(log["eval_steps"]) + 1, log["validation_loss"], "o--", color=color, ms=3,
                label=f"{prefix}validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(load, num_layers, path, title):
    """load: [2L, E] share of each router's top-k choices per expert (reference.routing.expert_load) -> a PNG at
    path, one heat map for the attention (MoA) routers and one for the MLP (MoE) routers."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for j, (ax, kind) in enumerate(zip(axes, ["attention (MoA)", "MLP (MoE)"])):
        image = ax.imshow(100 * load[j::2], cmap="viridis", vmin=0, vmax=100 * load.max(), aspect="auto")
        ax.set_title(f"{kind} experts")
        ax.set_xlabel("expert")
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(num_layers))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="% of the layer's top-k choices")
    fig.suptitle(f"{title} (uniform = {100 / load.shape[1]:.1f}%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
