"""The notebooks' drawing code and number formatting, so that a notebook cell shows what is drawn, not how.
Shapes: reference/__init__.py.

Every function draws from data it is given (a config, a routing plan, a trace, a training log) and returns the
matplotlib figure (or the table's text); nothing here computes model numbers of its own.
"""

import json
import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch
from matplotlib.text import Text

from reference.counting import PARTS

EXPERT_COLORS = plt.get_cmap("tab10")


def si(number, unit=""):
    # 8522231808 -> "8.52 G": three significant digits and an SI prefix
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.3g} {prefix}{unit}"
    return f"{number:.3g} {unit}".rstrip()  # 0 -> "0": no trailing space to misalign a column


def part_table(columns):
    # {column title: {part: number}} -> a table, one row per part of reference.counting.PARTS, then the totals
    width = max(12, *(len(title) for title in columns))
    lines = [f"{'':<20}" + "".join(f"{title:>{width + 2}}" for title in columns)]
    for part in PARTS + ("total",):
        row = [sum(c.values()) if part == "total" else c[part] for c in columns.values()]
        lines.append(f"{part:<20}" + "".join(f"{si(n):>{width + 2}}" for n in row))
    return "\n".join(lines)


COLORS = {"io": "#eeeeee", "norm": "#e3f0d8", "router": "#fde2c8", "expert": "#d8e6f7", "shared": "#efe0f5",
          "math": "#fff6c8", "stack": "#d8e6f7", "plus": "white"}
SHAPE_COLOR = "#1f3f8f"


def dims(*named):
    # "T", ("D", 128), ... -> "[T, D=128]": each dimension by its legend letter, with its size where the config fixes it
    return "[" + ", ".join(d if isinstance(d, str) else f"{d[0]}={d[1]}" for d in named) + "]"


def node(ax, x, y, text, kind, size=9):
    # a box sized to its text, centred on (x, y); arrows attach to its outline
    style = "circle,pad=0.15" if kind == "plus" else "round,pad=0.5"
    return ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=3,
                   bbox=dict(boxstyle=style, facecolor=COLORS[kind], edgecolor="#555555"))


def link(ax, a, b, label="", head=True, dashed=False, bend="arc3", where=0.5, side="right", label_at=None):
    # an arrow from a to b (nodes or (x, y) points), cut at the nodes' outlines, with `label` (a tensor's shape)
    # beside `label_at`, by default the point `where` of the way from a to b
    ends = [end.get_position() if isinstance(end, Text) else end for end in (a, b)]
    patches = [end.get_bbox_patch() if isinstance(end, Text) else None for end in (a, b)]
    # drawn after the nodes (zorder), so their outlines are in place when the arrow is cut at them
    ax.add_patch(FancyArrowPatch(*ends, patchA=patches[0], patchB=patches[1], connectionstyle=bend,
                                 arrowstyle="-|>" if head else "-", mutation_scale=12, color="#333333", lw=1.1,
                                 linestyle="--" if dashed else "-", shrinkA=0, shrinkB=0, zorder=3.5))
    if label:
        x, y = label_at or (ends[0][0] + where * (ends[1][0] - ends[0][0]),
                            ends[0][1] + where * (ends[1][1] - ends[0][1]))
        ax.text(x + (0.35 if side == "right" else -0.35), y, label, fontsize=8, color=SHAPE_COLOR, va="center",
                ha="left" if side == "right" else "right", zorder=4,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.4, alpha=0.85))


def region(ax, bottom, top, title):
    # the shaded frame of the MoA or the MoE, titled in its lower right corner
    ax.add_patch(plt.Rectangle((2.8, bottom), 21, top - bottom, facecolor="#f5f7fb", edgecolor="#9aaac4", zorder=0))
    ax.text(23.5, bottom + 1.2, title, ha="right", fontsize=10, weight="bold", color="#3b4a6b")


def draw_jetmoe(config, name):
    """The stack (left) and one block with its MoA and MoE (right), drawn from `config`: every box names its weight
    and shape, every edge its tensor's shape, for one sequence of T tokens."""
    D, E, K, H, Dh, F, V, L = (config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                               config.num_key_value_heads, config.kv_channels, config.intermediate_size,
                               config.vocab_size, config.num_hidden_layers)
    hidden = dims("T", ("D", D))
    fig, (stack, block) = plt.subplots(1, 2, figsize=(14, 11), layout="constrained",
                                     gridspec_kw=dict(width_ratios=[1, 2.4]))
    for ax, width in ((stack, 10), (block, 24)):
        ax.set(xlim=(0, width), ylim=(-4, 100))
        ax.axis("off")
    fig.suptitle(f"{name}: D={D}, L={L}, E={E}, K={K}, H={H}, Dh={Dh}, F={F}, V={V}", fontsize=12)

    # the stack
    embed = node(stack, 5, 86, f"embed_tokens\n{dims(('V', V), ('D', D))}", "io")
    blocks = node(stack, 5, 56, f"{L} x block\n\nMoA + residual\nMoE + residual\n\n(one block: right)", "stack", 10)
    norm = node(stack, 5, 27, "norm (final RMSNorm)", "norm")
    tied = "tied: the same matrix\nas embed_tokens" if config.tie_word_embeddings else "untied: a matrix of its own"
    head = node(stack, 5, 13, f"lm_head {dims(('V', V), ('D', D))}\n{tied}", "io")
    link(stack, (5, 98), embed, "input_ids " + dims("T"), where=0.3)
    link(stack, embed, blocks, "h " + hidden, where=0.35)
    link(stack, blocks, norm, hidden, where=0.6)
    link(stack, norm, head, hidden)
    link(stack, head, (5, -2), "logits " + dims("T", ("V", V)), where=0.6)

    # one block: the residual stream runs down the left edge; each sublayer adds into it at a "+"
    xr, xa, xm, xk = 1.0, 5.5, 13.0, 20.5  # columns: residual, routers, experts, kv_proj
    block.text(xr + 0.3, 99.5, "h " + hidden, fontsize=9, va="center")

    # MoA
    region(block, 55, 90.8, "MoA: mixture of attention heads")
    norm_moa = node(block, xm, 95, "input_layernorm (RMSNorm)", "norm")
    link(block, (xr, 97.5), (xm, 97.5), head=False)
    link(block, (xm, 97.5), norm_moa)
    router = node(block, xa, 84, f"router {dims(('E', E), ('D', D))}\ntop-{K} of {E}", "router")
    query = node(block, xm, 84, f"query experts, K={K} of E={E}\nW_q[e] {dims(('H*Dh', H * Dh), ('D', D))}",
                 "expert")
    kv = node(block, xk, 84, f"kv_proj, shared\n{dims(('2*H*Dh', 2 * H * Dh), ('D', D))}", "shared")
    link(block, norm_moa, (xm, 89.5), "x " + hidden, head=False)
    link(block, (xa, 89.5), (xk, 89.5), head=False)
    for target in (router, query, kv):
        link(block, (target.get_position()[0], 89.5), target)
    link(block, router, query, dashed=True)
    attend = node(block, 16.75, 72, f"RoPE on q and k; softmax(q k^T / sqrt(Dh) + causal mask) v\n"
                  f"K*H = {K * H} query heads share H = {H} kv heads", "math")
    link(block, query, attend, "q " + dims("T", ("K*H", K * H), ("Dh", Dh)), side="left")
    link(block, kv, attend, "k, v " + dims("T", ("H", H), ("Dh", Dh)))
    output = node(block, xm + 1.5, 61, f"output experts, K of E: W_o[e] {dims(('D', D), ('H*Dh', H * Dh))}\n"
                  f"sum over k of gate * W_o[e] context, + bias {dims(('D', D))}", "expert")
    link(block, attend, output, "context " + dims("T", ("K", K), ("H*Dh", H * Dh)), where=0.45)
    gates = "top_k_indices,\ngates " + dims("T", ("K", K))
    link(block, router, output, gates, dashed=True, bend="angle,angleA=-90,angleB=180,rad=0", side="left",
         label_at=(xa, 72))
    plus_moa = node(block, xr, 53, "+", "plus", 11)
    link(block, output, plus_moa, hidden, bend="angle,angleA=-90,angleB=0,rad=0", label_at=(xm - 6, 53.9))

    # MoE
    region(block, 8, 44.8, "MoE: mixture of SwiGLU MLP experts")
    norm_moe = node(block, xm, 48.5, "post_attention_layernorm (RMSNorm)", "norm")
    link(block, (xr, 50.5), (xm, 50.5), head=False)
    link(block, (xm, 50.5), norm_moe)
    router = node(block, xa, 38, f"router {dims(('E', E), ('D', D))}\ntop-{K} of {E}", "router")
    up = node(block, xm, 38, f"MLP experts, K={K} of E={E}\nW_in[e] {dims(('2F', 2 * F), ('D', D))}", "expert")
    link(block, norm_moe, (xm, 43), "x " + hidden, head=False, where=0.4)
    link(block, (xa, 43), (xm, 43), head=False)
    link(block, (xa, 43), router)
    link(block, (xm, 43), up)
    link(block, router, up, dashed=True)
    act = node(block, xm, 28.5, "SwiGLU: silu(gate half) * up half", "math")
    link(block, up, act, "x gathered by expert, then W_in: " + dims("N*K", ("2F", 2 * F)))
    down = node(block, xm, 18, f"W_out[e] {dims(('D', D), ('F', F))}, back to slot order\n"
                f"sum over k of gate * expert_out, + bias {dims(('D', D))}", "expert")
    link(block, act, down, "expert_act " + dims("N*K", ("F", F)))
    link(block, router, down, gates, dashed=True, bend="angle,angleA=-90,angleB=180,rad=0", side="left",
         label_at=(xa, 28.5))
    plus_moe = node(block, xr, 5, "+", "plus", 11)
    link(block, down, plus_moe, hidden, bend="angle,angleA=-90,angleB=0,rad=0", label_at=(xm - 6, 5.9))
    link(block, (xr, 99), plus_moa)
    link(block, plus_moa, plus_moe)
    link(block, plus_moe, (xr, -3.5), "h " + hidden, where=0.4)
    block.text(0, -5, "Shapes for one sequence of T tokens: N = B*T = T rows, N*K slots (slot n*K + k is token n's "
               "k-th choice).\nK of E: the K experts a token's router picks in that layer; dashed: the routing.",
               fontsize=8.5, va="top")
    return fig


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


def draw_online_softmax(scores, tile, running_max, running_sum):
    """scores: [S] one query row's scaled scores; running_max / running_sum: [S / tile] the online softmax's m and l
    after each tile -> the figure: the scores in their key tiles with m drawn across each tile, and l, rescaled by
    e^(m_old - m_new) at each tile, reaching the full softmax's sum at the last."""
    keys = np.arange(len(scores))
    edges = np.minimum(np.arange(len(running_max) + 1) * tile, len(scores)) - 0.5  # [tiles + 1] tile boundaries
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for i in range(len(running_max)):
        top.axvspan(edges[i], edges[i + 1], color="0.92" if i % 2 else "0.85", zorder=0)
    top.plot(keys, scores, ".", color="tab:blue", label="scores q·k/√Dh of one query row")
    top.stairs(running_max, edges, baseline=None, color="tab:red", label="running max m after each tile")
    top.set_ylabel("score")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"online softmax: the keys in tiles of {tile}, one pass, no row of probabilities stored")
    full = np.exp(scores - scores.max()).sum()
    bottom.stairs(running_sum, edges, baseline=None, color="tab:green",
                  label="running sum l after each tile (at its m)")
    bottom.axhline(full, color="k", linestyle=":", label="full softmax's sum, Σ e^(s - max s)")
    bottom.set_xlabel("key position s")
    bottom.set_ylabel("l")
    bottom.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
