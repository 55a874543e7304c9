"""Image tokens: 2x2 latent patches, channel-major inside a patch, raster order over the grid."""

import pytest
import torch

from nextstep_core.engine.model import patchify, unpatchify


def test_patchify_layout_by_hand():
    latent = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, H=4, W=6
    tokens = patchify(latent)
    assert tokens.shape == (1, 2 * 3, 2 * 4)
    # token 1 = grid row 0, column 1: pixels (0..1, 2..3); numbers ordered (c, p, q)
    expected = [latent[0, c, p, 2 + q].item() for c in range(2) for p in range(2) for q in range(2)]
    assert tokens[0, 1].tolist() == expected
    # token 3 = grid row 1, column 0 (raster order over a 2x3 grid)
    expected = [latent[0, c, 2 + p, q].item() for c in range(2) for p in range(2) for q in range(2)]
    assert tokens[0, 3].tolist() == expected


@pytest.mark.parametrize("grid", [(3, 5), (5, 3), (1, 7), (4, 4)])
def test_round_trip_on_non_square_grids(grid):
    latent = torch.randn(2, 16, 2 * grid[0], 2 * grid[1])
    tokens = patchify(latent)
    assert tokens.shape == (2, grid[0] * grid[1], 64)
    assert torch.equal(unpatchify(tokens, grid), latent)


def test_unpatchify_needs_a_matching_grid():
    with pytest.raises(ValueError, match="15 tokens do not fill a 4x4 token grid"):
        unpatchify(torch.zeros(1, 15, 64), (4, 4))
