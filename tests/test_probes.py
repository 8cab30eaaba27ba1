"""1-D probes: a latent equal to the property is found with a loss near 0, a useless one costs the
base-rate entropy, sparse codes give the same losses as the dense matrix; token properties."""

import numpy as np
import pytest

from sae_platform.errors import PlatformError
from sae_platform.probes import (
    PROPERTIES,
    base_rate_entropy,
    best_probe_losses,
    best_probe_losses_dense,
    token_properties,
)


def test_the_latent_that_is_the_property_wins_with_loss_near_zero():
    rng = np.random.default_rng(0)
    n = 3000
    y = rng.random(n) < 0.2
    noise = np.where(rng.random((n, 5)) < 0.1, rng.random((n, 5)) * 3, 0.0)
    x = noise.copy()
    x[:, 3] = y * 2.5  # latent 3 fires exactly on the property
    rows, cols = np.nonzero(x)
    loss, best = best_probe_losses(rows, cols, x[rows, cols], n, 5, y[None])
    assert best[0] == 3 and loss[0] < 0.02
    # without latent 3, nothing is informative: every loss is ~ the base-rate entropy
    x[:, 3] = 0
    rows, cols = np.nonzero(x)
    loss, _ = best_probe_losses(rows, cols, x[rows, cols], n, 5, y[None])
    assert loss[0] == pytest.approx(base_rate_entropy(y[None])[0], abs=0.01)


def test_sparse_and_dense_inputs_agree_and_partial_information_is_between():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.random(n) < 0.3
    x = np.where(rng.random((n, 3)) < 0.5, rng.normal(size=(n, 3)), 0.0)
    x[:, 1] = y + rng.normal(scale=0.7, size=n)  # informative, not perfect
    rows, cols = np.nonzero(x)
    sparse = best_probe_losses(rows, cols, x[rows, cols], n, 3, y[None])
    r, c = np.nonzero(np.ones_like(x, dtype=bool))
    dense = best_probe_losses(r, c, x.reshape(-1), n, 3, y[None])
    assert sparse[1][0] == dense[1][0] == 1
    assert sparse[0][0] == pytest.approx(dense[0][0], rel=1e-6)
    matrix = best_probe_losses_dense(x, y[None])      # the neurons' form: the same fit on quantile bins
    assert matrix[1][0] == 1 and matrix[0][0] == pytest.approx(dense[0][0], abs=1e-3)
    assert 0.05 < sparse[0][0] < base_rate_entropy(y[None])[0] - 0.05
    with pytest.raises(PlatformError, match="labels"):
        best_probe_losses(rows, cols, x[rows, cols], n, 3, y[None, :10])


def test_token_properties():
    pieces = ["\n", "\n", "HAM", "LET", ".", "\n", "He", " said", " \"", "go", " 12", " now", "\"", ",", " (",
              "aside", ")", " and", " left", ".", "\n", "Then"]
    p = token_properties(pieces)
    assert set(p) == set(PROPERTIES) and len(PROPERTIES) >= 8
    on = {k: [i for i in range(len(pieces)) if p[k][i]] for k in PROPERTIES}
    assert on["speaker_name"] == [2, 3]
    assert on["inside_quotes"] == [9, 10, 11]
    assert on["number"] == [10]
    assert on["start_of_line"] == [2, 6, 21]
    assert on["end_of_sentence"] == [4, 19]
    assert on["comma"] == [13]
    assert on["inside_parentheses"] == [15]
    assert on["all_caps_word"] == [2, 3]
    assert 6 in on["capitalized_word"] and 21 in on["capitalized_word"] and 7 not in on["capitalized_word"]
    assert on["word_start"] == [7, 11, 17, 18]
