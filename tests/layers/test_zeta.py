"""Zeta zeros (exact, cached) and the zeta-frequency token table."""

import json
import math

import pytest
import torch

from muse.layers import zeta
from muse.layers.zeta import zeta_token_table, zeta_zeros

# Odlyzko's tables, to 15 decimals
KNOWN = [14.134725141734693, 21.022039638771555, 25.010857580145688, 30.424876125859513,
         32.935061587739189]


@pytest.fixture
def counted(monkeypatch):
    """Counts the zeros mpmath is asked for, with a fresh in-process cache."""
    calls = []
    compute = zeta._compute

    def spy(first, last):
        calls.append((first, last))
        return compute(first, last)

    monkeypatch.setattr(zeta, "_compute", spy)
    zeta._zeros.cache_clear()
    yield calls
    zeta._zeros.cache_clear()


def test_first_zeros_match_the_known_values(tmp_path):
    # mpmath's 30-digit zeros rounded once to doubles: within 1e-9 of the tables (in fact
    # within an ulp of the 15-decimal values)
    got = zeta_zeros(5, tmp_path)
    assert len(got) == 5
    for g, want in zip(got, KNOWN, strict=True):
        assert abs(g - want) < 1e-9


def test_zeros_are_the_first_n_in_order(tmp_path):
    """The Riemann–von Mangoldt count: N(T) = θ(T)/π + 1 + S(T) with |S(T)| < 1 for T < 100,
    so the n-th zero has θ(γ_n)/π + 1 within 1.5 of n − ½ (no zero skipped or repeated)."""
    import mpmath

    got = zeta_zeros(24, tmp_path)
    assert all(a < b for a, b in zip(got[:-1], got[1:], strict=True))
    for n, g in enumerate(got, start=1):
        smooth = float(mpmath.siegeltheta(g)) / math.pi + 1
        assert abs(smooth - (n - 0.5)) < 1.5, (n, g, smooth)


def test_cache_serves_repeated_and_shorter_requests_without_mpmath(tmp_path, counted):
    first = zeta_zeros(6, tmp_path)
    assert counted == [(1, 6)]
    assert zeta_zeros(6, tmp_path) == first  # in-process
    zeta._zeros.cache_clear()
    assert zeta_zeros(6, tmp_path) == first  # from disk
    assert zeta_zeros(3, tmp_path) == first[:3]
    assert counted == [(1, 6)]
    longer = zeta_zeros(8, tmp_path)  # only the two missing zeros are computed
    assert counted == [(1, 6), (7, 8)] and longer[:6] == first
    stored = json.loads((tmp_path / zeta.CACHE_NAME).read_text())["zeros"]
    assert stored == list(longer)


def test_a_corrupt_cache_file_is_recomputed_not_trusted(tmp_path, counted):
    path = tmp_path / zeta.CACHE_NAME
    path.write_text(json.dumps({"zeros": [1.0, 2.0, 3.0]}))
    got = zeta_zeros(3, tmp_path)
    assert counted == [(1, 3)] and abs(got[0] - KNOWN[0]) < 1e-9
    path.write_text("not json")
    zeta._zeros.cache_clear()
    assert zeta_zeros(3, tmp_path) == got


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_bad_count_is_named(bad):
    with pytest.raises(ValueError, match="positive integer"):
        zeta_zeros(bad)


def test_token_table_is_sinusoids_at_the_zeros():
    table = zeta_token_table(50, 7, std=0.02)
    gamma = zeta_zeros(4)
    s = 0.02 * math.sqrt(2)
    assert table.shape == (50, 7) and table.dtype == torch.float64
    v = 31
    want = [s * f(gamma[j] * v) for j in range(4) for f in (math.sin, math.cos)][:7]
    assert torch.allclose(table[v], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(zeta_token_table(50, 7), table)  # deterministic


def test_token_table_rows_are_nearly_orthogonal_with_the_usual_scale():
    table = zeta_token_table(512, 64)
    # RMS of each entry ≈ std = 0.02 (each sin/cos pair has mean square s²/2 = std² per entry)
    assert abs(table.square().mean().sqrt().item() - 0.02) < 2e-3
    unit = table / table.norm(dim=1, keepdim=True)
    cos = unit @ unit.T - torch.eye(512, dtype=torch.float64)
    # as for Gaussian rows: random unit vectors in 64 dims have mean |cos| ≈ 0.10 and, over
    # these 130k pairs, a largest |cos| ≈ 0.5; this table measures 0.095 and 0.39
    assert cos.abs().mean() < 0.12 and cos.abs().max() < 0.5
