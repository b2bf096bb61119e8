"""Notebook 03: the dispatch plan, the slots grouped by expert."""

import numpy as np


def my_dispatch(top_k_indices, num_experts):
    # top_k_indices: [N, K] -> sorted_slots [N*K] (slot ids n*K + k grouped by expert, in slot order inside a group),
    # expert_offsets [E+1] (expert e owns sorted_slots[offsets[e]:offsets[e+1]])
    flat = top_k_indices.reshape(-1)  # [N*K] the expert of each slot
    sorted_slots = np.argsort(flat, kind="stable")  # stable: a group keeps its slots in order
    counts = np.bincount(flat, minlength=num_experts)  # [E], zero for an expert no slot chose
    return sorted_slots, np.concatenate([[0], np.cumsum(counts)])
