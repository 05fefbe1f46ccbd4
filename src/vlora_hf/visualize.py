"""What an image changed in the LLM: the size of each perceptual-weights delta, per receiving layer and target.

An image adds `x @ A @ Bᵀ` to a target projection, i.e. the weight `A Bᵀ` ([d_in, d_out], never built). Its
Frobenius norm comes from the two r×r Gram matrices: ||A Bᵀ||² = tr(B AᵀA Bᵀ) = Σᵢⱼ (AᵀA)ᵢⱼ (BᵀB)ᵢⱼ, so a 7B
model's deltas are measured in r² work per target instead of d_in·d_out.

    norms = delta_norms(model, processor.image_processor(image, return_tensors="pt")["pixel_values"])
    plot_delta_norms(norms).savefig("delta_norms.png")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeltaNorms:
    """values[i, j, k]: ||A Bᵀ||_F of image i at receiving layer `layers[j]` and target `targets[k]`."""

    values: torch.Tensor
    layers: list[int]
    targets: list[str]


@torch.no_grad()
def delta_norms(model, pixel_values: torch.Tensor | None = None, *, perceptual_weights: torch.Tensor | None = None
                ) -> DeltaNorms:
    """Frobenius norm of every delta the images add, from pixels or from precomputed perceptual weights."""
    if (pixel_values is None) == (perceptual_weights is None):
        raise ValueError("delta_norms needs exactly one of pixel_values or perceptual_weights")
    if perceptual_weights is None:
        perceptual_weights = model.get_image_features(pixel_values=pixel_values)
    generator = model.model.generator
    A, B = generator.split(perceptual_weights), generator.scaled_B()
    columns = []
    for target in generator.targets:
        a, b = A[target].double(), B[target].double()  # [n, slots, d_in, r], [slots, d_out, r]
        gram_a = a.transpose(-1, -2) @ a  # [n, slots, r, r]
        gram_b = b.transpose(-1, -2) @ b  # [slots, r, r]
        columns.append((gram_a * gram_b).sum((-1, -2)).clamp(min=0).sqrt())
    return DeltaNorms(torch.stack(columns, -1).float().cpu(), list(model.config.receiving_layers), list(generator.targets))


def plot_delta_norms(norms: DeltaNorms, titles: list[str] | None = None):
    """One heat map per image (targets × receiving layers, values written in), on a shared colour scale.

    Returns a matplotlib `Figure` (no pyplot state, so it is safe in a server's worker threads).
    """
    from matplotlib.figure import Figure

    n = norms.values.shape[0]
    titles = titles or [f"image {i}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    vmax = float(norms.values.max()) or 1.0
    width = 1.2 + 0.55 * len(norms.layers)
    fig = Figure(figsize=(min(max(width, 3.5), 12) * n + 1, 0.45 * len(norms.targets) + 1.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, grid, title in zip(axes, norms.values, titles):
        heat = ax.imshow(grid.T.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(title)
        ax.set_xticks(range(len(norms.layers)), [str(layer) for layer in norms.layers])
        ax.set_yticks(range(len(norms.targets)), norms.targets)
        ax.set_xlabel("receiving layer")
        if len(norms.layers) <= 12:
            for j, row in enumerate(grid.tolist()):
                for k, value in enumerate(row):
                    ax.text(j, k, f"{value:.3g}", ha="center", va="center", fontsize=8,
                            color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(heat, ax=list(axes), label="‖A·Bᵀ‖_F")
    return fig


__all__ = ["DeltaNorms", "delta_norms", "plot_delta_norms"]
