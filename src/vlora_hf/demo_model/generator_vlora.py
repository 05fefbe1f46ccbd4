"""The perceptual weights generator: the image's tower features in, one low-rank factor per target out.

Image features -> per-image low-rank factors A, one [d_in, r] matrix per (target, receiving layer). The static
factor B of each target is a plain parameter here too, so the generator owns everything the image adds.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_vlora import VLoRAConfig


class WeightsDecoder(nn.Module):
    """Learnable queries that read the visual features through pre-LN transformer decoder blocks.

    Each query becomes one flattened [d_in, r] factor through the shared linear `weights_head`.
    """

    def __init__(self, config: VLoRAConfig, num_queries: int, out_features: int):
        super().__init__()
        g = config.generator_hidden_size
        self.queries = nn.Parameter(torch.zeros(1, num_queries, g))
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d_model=g,
                nhead=config.generator_num_heads,
                dim_feedforward=g * config.generator_mlp_ratio,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.generator_depth)
        )
        self.norm = nn.LayerNorm(g)
        self.weights_head = nn.Linear(g, out_features)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """visual [n, P, g] -> flattened factors [n, num_queries, out_features]."""
        q = self.queries.expand(visual.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, visual)
        return self.weights_head(self.norm(q))


class PerceptualWeightsGenerator(nn.Module):
    """Visual features [n, P, Dv] -> perceptual weights [n, D], the A factors of every target, flattened.

    The flat layout (target-major, then receiving layer, then d_in, then r) is what travels through
    `generate` (a single tensor is expanded row-wise for beams); `split` turns it back into per-target views.
    """

    def __init__(self, config: VLoRAConfig):
        super().__init__()
        self.targets = list(config.target_modules)
        self.num_slots = len(config.receiving_layers)
        self.rank = config.lora_rank
        self.scale = config.lora_scale
        self.in_widths = {t: config.target_shape(t)[0] for t in self.targets}
        g = config.generator_hidden_size
        self.visual_proj = nn.Linear(config.vision_config.hidden_size, g)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_visual_positions, g))
        if config.separate_generators:
            self.decoders = nn.ModuleList(
                WeightsDecoder(config, self.num_slots, self.in_widths[t] * self.rank) for t in self.targets
            )
        else:
            width = self.in_widths[self.targets[0]] * self.rank
            self.decoders = nn.ModuleList([WeightsDecoder(config, self.num_slots * len(self.targets), width)])
        # B starts at zero, like LoRA's B: an untrained generator leaves the backbone unchanged.
        self.lora_B = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(self.num_slots, config.target_shape(t)[1], self.rank)) for t in self.targets}
        )

    @property
    def weights_dim(self) -> int:
        """D, the length of one image's flattened perceptual weights."""
        return sum(self.num_slots * self.in_widths[t] * self.rank for t in self.targets)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features [n, P, Dv] -> perceptual weights [n, D]."""
        if image_features.dim() != 3 or image_features.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(
                f"image features must be [n_images, {self.pos_embed.shape[1]}, {self.visual_proj.in_features}], "
                f"got {list(image_features.shape)}"
            )
        visual = self.visual_proj(image_features.to(self.visual_proj.weight.dtype)) + self.pos_embed
        outputs = [decoder(visual) for decoder in self.decoders]
        return torch.cat([out.flatten(1) for out in outputs], dim=1)

    def split(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat weights [n, D] -> {target: A [n, num_slots, d_in, r]} (views, no copy)."""
        if weights.dim() != 2 or weights.shape[1] != self.weights_dim:
            raise ValueError(f"perceptual weights must be [n, {self.weights_dim}], got {list(weights.shape)}")
        sizes = [self.num_slots * self.in_widths[t] * self.rank for t in self.targets]
        chunks = torch.split(weights, sizes, dim=1)
        return {
            t: c.view(weights.shape[0], self.num_slots, self.in_widths[t], self.rank)
            for t, c in zip(self.targets, chunks)
        }

    def scaled_B(self) -> dict[str, torch.Tensor]:
        """{target: B [num_slots, d_out, r]} multiplied by alpha / r."""
        return {t: b * self.scale for t, b in self.lora_B.items()}
