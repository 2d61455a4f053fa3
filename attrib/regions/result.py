"""RegionResult: per-sample, per-layer influence maps over a region set, with their drawing methods."""
from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from PIL import Image

from attrib.regions.regions import RegionSet


@dataclass
class RegionResult:
    """maps [N, len(layers), C]: influence of region c on sample n at layer ``layers[i]``.

    ``layers`` are LM layer indices; a propagated method measured at the output has layers == [-1].
    ``meta`` records the method, its noise rule, σ, draws and seed, the region set and the model.
    """

    maps: torch.Tensor
    layers: list[int]
    regions: RegionSet
    method: str
    meta: dict = field(default_factory=dict)

    @property
    def grid(self) -> torch.Tensor:
        """maps reshaped to [N, layers, rows, cols]."""
        rows, cols = self.regions.shape
        return self.maps.reshape(*self.maps.shape[:2], rows, cols)

    def mean_map(self) -> torch.Tensor:
        """[layers, C] averaged over samples, each sample's map first normalised to sum 1."""
        norm = self.maps / self.maps.sum(-1, keepdim=True).clamp(min=1e-12)
        return norm.mean(0)

    def argmax_cells(self) -> torch.Tensor:
        """LongTensor [N, layers]: the most influential region per sample and layer."""
        return self.maps.argmax(-1)

    def plot_heatmaps(self, sample: int | None = None, layers: list[int] | None = None, cols: int = 6):
        """A grid of layer maps (one panel per layer) for one sample, or the normalised mean."""
        chosen = layers if layers is not None else self.layers
        data = self.mean_map() if sample is None else self.maps[sample]
        rows_n = int(np.ceil(len(chosen) / cols))
        fig, axes = plt.subplots(rows_n, min(cols, len(chosen)), figsize=(2.2 * min(cols, len(chosen)), 2.2 * rows_n),
                                 squeeze=False)
        r, c = self.regions.shape
        for ax in axes.flat:
            ax.axis("off")
        for ax, layer in zip(axes.flat, chosen):
            values = data[self.layers.index(layer)].reshape(r, c).numpy()
            sns.heatmap(values, ax=ax, cbar=False, square=r > 1, cmap="magma", xticklabels=False, yticklabels=False)
            ax.set_title("output" if layer < 0 else f"layer {layer}", fontsize=9)
        fig.suptitle(f"{self.method} ({'mean over samples' if sample is None else f'sample {sample}'})", fontsize=10)
        fig.tight_layout()
        return fig

    def plot_layer_by_region(self):
        """One heatmap: layers (rows) × regions (columns), normalised mean over samples."""
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.12 * self.maps.shape[-1]), 1 + 0.3 * len(self.layers)))
        sns.heatmap(self.mean_map().numpy(), ax=ax, cmap="magma", yticklabels=self.layers, xticklabels=False)
        ax.set_xlabel(f"region ({self.regions.name}, row-major)")
        ax.set_ylabel("layer")
        ax.set_title(self.method)
        fig.tight_layout()
        return fig

    def plot_overlay(self, sample: int, image: Image.Image, layers: list[int], box=None, alpha: float = 0.55):
        """Chosen layers' maps over the input image; ``box`` (x0, y0, x1, y1 px) is drawn when known."""
        fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.8), squeeze=False)
        width, height = image.size
        r, c = self.regions.shape
        for ax, layer in zip(axes[0], layers):
            ax.imshow(image)
            values = self.maps[sample, self.layers.index(layer)].reshape(r, c).numpy()
            ax.imshow(values, cmap="jet", alpha=alpha, extent=(0, width, height, 0), interpolation="nearest")
            if box is not None:
                x0, y0, x1, y1 = box
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=2))
            ax.set_title("output" if layer < 0 else f"layer {layer}", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        return fig
