"""Related features: exact decoder-cosine neighbours equal a dense brute force whatever the block
size (never the latent itself), and co-occurrence shares counted by hand."""

import numpy as np
import pytest
import torch

from sae_platform.errors import PlatformError
from sae_platform.similarity import cooccurring, nearest_by_decoder


def test_nearest_by_decoder_matches_brute_force_for_any_block():
    torch.manual_seed(0)
    W = torch.randn(300, 16)
    unit = W / W.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2)
    want = sims[40:90].topk(10, dim=1)
    for max_elements in (300, 300 * 7, 1 << 24):  # one row, 7 rows, everything per block
        idx, cos = nearest_by_decoder(W, 40, 90, k=10, max_elements=max_elements)
        assert (idx == want.indices.numpy()).all()
        np.testing.assert_allclose(cos, want.values.numpy(), rtol=1e-5)
        assert not (idx == np.arange(40, 90)[:, None]).any()


def test_nearest_edge_cases():
    W = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0]])
    idx, cos = nearest_by_decoder(W, 0, 3, k=4)
    assert idx[0, 0] == 1 and cos[0, 0] > 0.99 and idx[0, 2] == -1 and np.isnan(cos[0, 2])
    with pytest.raises(PlatformError, match="outside"):
        nearest_by_decoder(W, 2, 5)


def test_cooccurring_shares():
    # tokens 0..3; latent 1 fires on 0,1,2,3; latent 2 on 0,1; latent 3 on 3; latent 4 nowhere with 1
    positions = np.array([0, 0, 1, 1, 2, 3, 3, 9])
    features = np.array([1, 2, 1, 2, 1, 1, 3, 4])
    out = cooccurring(positions, features, [1, 2, 4, 5], k=5)
    assert out[1] == [(2, 0.5), (3, 0.25)]
    assert out[2] == [(1, 1.0)]
    assert out[4] == [] and out[5] == []
