"""The notebooks' drawing code, so that a notebook cell shows what is drawn, not how.  Shapes: reference/__init__.py.

Every function draws from data it is given (a routing plan, a trace, a config, a training log) and returns the
matplotlib figure; nothing here computes model numbers of its own.
"""

import json
import os

import matplotlib.pyplot as plt
import numpy as np

EXPERT_COLORS = plt.get_cmap("tab10")


def _box(ax, x, y, text, color, width=0.8, height=0.8):
    # one labelled cell centred on (x, y)
    ax.add_patch(plt.Rectangle((x - width / 2, y - height / 2), width, height, facecolor=color, edgecolor="#444444",
                               lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def draw_dispatch(plan, num_experts):
    """plan: a RoutingPlan of N tokens -> the dispatch, column by column: tokens, their N*K slots (slot n*K + k),
    the slots grouped by expert (plan.sorted_slots, plan.expert_offsets) and scattered back to slot order, every line
    one slot's way."""
    tokens, top_k = plan.top_k_indices.shape
    slots = tokens * top_k
    slot_expert = plan.top_k_indices.reshape(-1)  # [N*K]
    fig, ax = plt.subplots(figsize=(11, 0.42 * slots + 1.4))
    columns = {"tokens n": 0, "slots s = n*K + k": 3, "grouped by expert\n(sorted_slots)": 6.5,
               "back in slot order\n(ungroup)": 10, "tokens: sum_k gate * y": 13}
    top = slots - 1

    def token_y(n):
        return top - (n * top_k + (top_k - 1) / 2)  # a token sits level with the middle of its slots

    for title, x in columns.items():
        ax.text(x, top + 1.2, title, ha="center", va="bottom", fontsize=9, weight="bold")
    for n in range(tokens):
        for x in (columns["tokens n"], columns["tokens: sum_k gate * y"]):
            _box(ax, x, token_y(n), f"token {n}", "#eeeeee", width=1.4, height=0.8 * top_k)
    for s in range(slots):
        color = EXPERT_COLORS(slot_expert[s] % 10)
        _box(ax, columns["slots s = n*K + k"], top - s, f"s={s}: e{slot_expert[s]}", color, width=1.4)
        _box(ax, columns["back in slot order\n(ungroup)"], top - s, f"s={s}", color, width=1.4)
        ax.plot([columns["tokens n"] + 0.7, columns["slots s = n*K + k"] - 0.7], [token_y(s // top_k), top - s],
                color="#888888", lw=0.8)
        ax.plot([columns["back in slot order\n(ungroup)"] + 0.7, columns["tokens: sum_k gate * y"] - 0.7],
                [top - s, token_y(s // top_k)], color="#888888", lw=0.8)
    for row, s in enumerate(plan.sorted_slots):
        color = EXPERT_COLORS(slot_expert[s] % 10)
        _box(ax, columns["grouped by expert\n(sorted_slots)"], top - row, f"row {row}: s={s}", color, width=1.8)
        ax.plot([columns["slots s = n*K + k"] + 0.7, columns["grouped by expert\n(sorted_slots)"] - 0.9],
                [top - s, top - row], color=color, lw=1.2)
        ax.plot([columns["grouped by expert\n(sorted_slots)"] + 0.9, columns["back in slot order\n(ungroup)"] - 0.7],
                [top - row, top - s], color=color, lw=1.2)
    for e in range(num_experts):
        start, end = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        where = columns["grouped by expert\n(sorted_slots)"] - 1.15
        if end > start:
            ax.plot([where, where], [top - start + 0.4, top - end + 1 - 0.4], color=EXPERT_COLORS(e % 10), lw=4)
            ax.text(where - 0.15, top - (start + end - 1) / 2, f"expert {e}\none matmul\nof {end - start} rows",
                    ha="right", va="center", fontsize=7.5)
    ax.set_xlim(-1, 14)
    ax.set_ylim(-1, top + 2.5)
    ax.axis("off")
    ax.set_title(f"The dispatch of {tokens} tokens, K={top_k}: tokens -> {slots} slots -> grouped by expert -> "
                 "scattered back", fontsize=10)
    return fig


def draw_expert_tokens(top_k_indices, labels, num_experts, title, shown=10):
    """top_k_indices: [N, K], labels: N token texts -> one line per expert: how many slots it took and its most
    frequent tokens (quoted, so that leading spaces show)."""
    fig, ax = plt.subplots(figsize=(12, 0.45 * num_experts + 0.8))
    for e in range(num_experts):
        tokens = np.nonzero((top_k_indices == e).any(axis=1))[0]  # [n_e] the tokens whose choices include e
        texts, counts = np.unique([labels[n] for n in tokens], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:shown]
        words = "  ".join(f"'{texts[i]}'" + (f" x{counts[i]}" if counts[i] > 1 else "") for i in order)
        ax.text(0, num_experts - 1 - e, f"expert {e} ({len(tokens)} tokens):", fontsize=9, weight="bold",
                color=EXPERT_COLORS(e % 10), va="center")
        ax.text(0.16, num_experts - 1 - e, words, fontsize=8.5, va="center", family="monospace")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.7, num_experts - 0.3)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return fig


def draw_kv_heads(top_k, heads):
    """The MoA's head mapping for K choices of H heads: query head k*H + j (choice k, head j) reads kv head j
    (HF's repeat), drawn as lines; repeat_interleave's kv head (qh // K) beside it, dashed, where it differs."""
    query_heads = top_k * heads
    fig, ax = plt.subplots(figsize=(8, 0.45 * query_heads + 1.2))
    for qh in range(query_heads):
        k, j = divmod(qh, heads)
        y = query_heads - 1 - qh
        _box(ax, 0, y, f"query head {qh}\n(choice k={k}, head {j})", EXPERT_COLORS(k % 10), width=2.2, height=0.85)
        kv_y = (query_heads - 1) * (1 - (j + 0.5) / heads)
        ax.plot([1.1, 3.9], [y, kv_y], color=EXPERT_COLORS(k % 10), lw=1.5)
        wrong = qh // top_k
        if wrong != j:
            ax.plot([1.1, 3.9], [y, (query_heads - 1) * (1 - (wrong + 0.5) / heads)], color="#bb3333", lw=0.8,
                    ls=":")
    for j in range(heads):
        _box(ax, 5, (query_heads - 1) * (1 - (j + 0.5) / heads), f"kv head {j}", "#efe0f5", width=2, height=0.85)
    ax.set_xlim(-1.3, 6.2)
    ax.set_ylim(-0.8, query_heads - 0.2)
    ax.axis("off")
    ax.set_title(f"K={top_k} choices x H={heads} heads: query head k*H + j reads kv head j (repeat, solid); "
                 "repeat_interleave's qh // K (dotted red) is another model", fontsize=9)
    return fig


def read_train_log(model_dir):
    # model_dir -> the train_log.json `jetmoe train` writes beside the weights (a dict of lists and settings)
    with open(os.path.join(model_dir, "train_log.json"), encoding="utf-8") as f:
        return json.load(f)


def draw_loss_curve(log, title):
    """log: a train_log.json dict -> the training loss per step and the validation loss at its evaluations (left),
    the smallest expert share of any router (right, where the log has it: 0 is a dead expert)."""
    fig, (loss, load) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw=dict(width_ratios=[1.6, 1]))
    loss.plot(log["steps"], log["train_loss"], lw=0.8, alpha=0.8, label="training loss (one batch)")
    loss.plot(log["eval_steps"], log["validation_loss"], "o-", ms=3, label="validation loss")
    loss.set(xlabel="step", ylabel="cross-entropy (nats)", title=title)
    loss.legend(fontsize=8)
    load.plot(log["eval_steps"], np.asarray(log["min_expert_load"]) * 100, "o-", ms=3, color="tab:red")
    load.axhline(100 / log["config"]["num_local_experts"], color="gray", ls="--", label="uniform 1/E")
    load.set(xlabel="step", ylabel="% of choices", title="least loaded expert of any router")
    load.legend(fontsize=8)
    return fig
