"""The image encoders' readout, computed directly: what tests/models pins every encoder's features against."""

from __future__ import annotations

import torch


def pooled_by_hand(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """Each cell's mean, cell i spanning rows floor(i*m/g) to ceil((i+1)*m/g) (adaptive pooling's rule), flattened
    channel-major like torch.flatten of a (B, C, g, g) map."""
    batch, channels, height, width = feature_map.shape
    cells = torch.empty(batch, channels, grid, grid)
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * height // grid, -(-(i + 1) * height // grid))
            cols = slice(j * width // grid, -(-(j + 1) * width // grid))
            cells[:, :, i, j] = feature_map[:, :, rows, cols].mean(dim=(2, 3))
    return cells.flatten(1)
