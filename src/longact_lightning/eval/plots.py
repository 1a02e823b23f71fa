"""PNG figures of Q/K channel magnitudes: per-layer per-head heatmaps, distributions, and the selected mask.

Rendering uses matplotlib's Agg backend (no display needed). Each function draws one figure from tensors it is
given and writes it to ``path``; the numbers behind every figure are also in the profile's CSV/JSON tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_heatmap(
    scores: Mapping[str, Mapping[str, torch.Tensor]], heads: Mapping[str, int], title: str, path: Path
) -> None:
    """One layer: a row per projection kind, a column per context, each an image of ``[heads, head_dim]``.

    Args:
        scores: ``{context label: {kind ("q"/"k"): [channels] magnitude}}``; channel order ``head * head_dim + dim``.
        heads: ``{kind: number of heads}`` (query heads, key/value heads).
        title: figure title.
        path: PNG to write.
    """
    plt = _pyplot()
    contexts, kinds = list(scores), list(heads)
    fig, axes = plt.subplots(len(kinds), len(contexts), figsize=(4.2 * len(contexts), 1.2 + 0.35 * sum(heads.values())),
                             squeeze=False)  # fmt: skip
    for row, kind in enumerate(kinds):
        vmax = max(float(scores[c][kind].max()) for c in contexts)  # one colour scale per kind: contexts comparable
        for col, context in enumerate(contexts):
            ax = axes[row][col]
            grid = scores[context][kind].reshape(heads[kind], -1).float().numpy()  # [heads, head_dim]
            image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{kind.upper()} · {context}", fontsize=9)
            ax.set_xlabel("channel within head", fontsize=8)
            ax.set_ylabel("head", fontsize=8)
            ax.set_yticks(range(heads[kind]))
            fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def magnitude_histograms(ratios: Mapping[str, Mapping[str, torch.Tensor]], path: Path) -> None:
    """Distribution of channel magnitude relative to its projection's median, one panel per kind.

    Args:
        ratios: ``{kind: {context label: [layers * channels] score / median of its projection}}``.
        path: PNG to write.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 3.8), squeeze=False)
    for ax, (kind, by_context) in zip(axes[0], ratios.items()):
        for context, values in by_context.items():
            logs = values.clamp_min(1e-6).log10().float().numpy()
            ax.hist(logs, bins=60, alpha=0.5, label=context, histtype="stepfilled")
        ax.set_yscale("log")
        ax.set_xlabel("log10(channel magnitude / median of its layer)")
        ax.set_ylabel("channels (all layers)")
        ax.set_title(f"{kind.upper()} channel magnitudes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def layer_channel_map(grids: Mapping[str, torch.Tensor], title: str, path: Path, boolean: bool = False) -> None:
    """All layers at once: one panel per kind showing a ``[layers, channels]`` grid (magnitudes or a mask).

    Args:
        grids: ``{kind: [layers, channels]}`` float magnitudes, or bool masks with ``boolean=True``.
        title: figure title.
        path: PNG to write.
        boolean: draw selected (True) channels in black on white.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(grids), 1, figsize=(10, 2.6 * len(grids)), squeeze=False)
    for ax, (kind, grid) in zip(axes[:, 0], grids.items()):
        data = grid.float().numpy()
        image = ax.imshow(data, aspect="auto", cmap="Greys" if boolean else "magma", interpolation="nearest")
        ax.set_title(f"{kind.upper()}", fontsize=9)
        ax.set_xlabel("channel (head * head_dim + dim)", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        if not boolean:
            fig.colorbar(image, ax=ax, fraction=0.03)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
