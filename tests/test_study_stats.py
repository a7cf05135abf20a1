"""The study's statistics against hand-computed values: the paired t-test's p-value and Holm's adjustment."""

import pytest

from fpe_lab.study import holm, paired_difference, paired_p_value


def test_paired_p_value_is_the_two_sided_t_test():
    # diffs 1, 2, 3: mean 2, sd 1, t = 2/(1/√3) = 2√3 on 2 degrees of freedom: p = 1 − 2√3/√(4 + 12)·... = 0.0742
    assert paired_p_value([1.0, 2.0, 3.0]) == pytest.approx(0.07417990022744853, rel=1e-12)  # float64 round-off
    assert paired_p_value([-1.0, -2.0, -3.0]) == pytest.approx(0.07417990022744853, rel=1e-12)
    assert paired_p_value([0.5]) == 1.0 and paired_p_value([0.0, 0.0]) == 1.0 and paired_p_value([1.0, 1.0]) == 0.0
    # consistent with the interval: it excludes zero exactly when p < 0.05
    for diffs in ([1.0, 2.0, 3.0], [1.0, 1.1, 0.9, 1.2], [-0.1, 0.2, 0.05]):
        assert paired_difference(diffs)[3] == (paired_p_value(diffs) < 0.05)


def test_holm_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 → 4·0.005, 3·0.01, 2·0.03, max(1·0.04, 0.06): back in input order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
