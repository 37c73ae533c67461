"""The cross-rank agreement's checksum of the values a call reads (ring attention's cu_seqlens):
ranks with equal checksums are taken to hold equal values, so two different boundary lists must not
share one -- including differences with no sum and no first moment, which every checksum whose
weights are linear in the position misses."""

import torch

from docqa_fast.distributed._comm import _checksum


def _boundaries(values):
    return torch.tensor(values, dtype=torch.int64)


def test_equal_values_give_equal_checksums():
    values = [0, 1, 114, 317, 317, 4096]
    assert torch.equal(_checksum(_boundaries(values)), _checksum(_boundaries(list(values))))


def test_differences_without_sum_or_first_moment_change_the_checksum():
    # d = (0, +1, -2, +1, 0): sum 0 and sum(i * d_i) 0; both valid (monotonic) boundary lists.
    a, b = [0, 10, 20, 30, 40], [0, 11, 18, 31, 40]
    assert not torch.equal(_checksum(_boundaries(a)), _checksum(_boundaries(b)))
    # Third differences (-1, 3, -3, 1) also cancel a quadratic weight; and q's half against k's half swapped.
    c, d = [0, 100, 200, 300, 400, 500], [0, 99, 203, 297, 401, 500]
    assert not torch.equal(_checksum(_boundaries(c)), _checksum(_boundaries(d)))
    assert not torch.equal(_checksum(_boundaries([0, 5, 9, 0, 4, 9])), _checksum(_boundaries([0, 4, 9, 0, 5, 9])))


def test_every_single_and_paired_change_of_a_short_list_changes_the_checksum():
    base = [0, 3, 7, 7, 12, 20, 0, 3, 7, 7, 12, 20]
    reference = _checksum(_boundaries(base))
    for i in range(len(base)):
        for j in range(i, len(base)):
            for delta in (-2, -1, 1, 2):
                changed = list(base)
                changed[i] += delta
                changed[j] -= delta if j != i else 0
                if changed != base:
                    assert not torch.equal(_checksum(_boundaries(changed)), reference), (i, j, delta)


def test_the_weights_stay_in_range_and_differ_between_the_two_sums():
    from docqa_fast.distributed._comm import _MODULUS, _weights

    weights = _weights(100_000, torch.device("cpu"))
    assert weights.shape == (2, 100_000) and int(weights.min()) >= 1 and int(weights.max()) < _MODULUS
    assert len(set(weights[0].tolist())) > 99_990 and not torch.equal(weights[0], weights[1])
