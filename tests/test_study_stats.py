"""The study's statistics against hand-computed values: the paired t-test's p-value and Holm's adjustment."""

import pytest

from fpe_lab.study import PRETRAINED, holm, paired_difference, paired_p_value, table_across


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


def test_table_across_adjusts_over_studies_and_arms():
    def rows(p, lo):
        return [{"arm": PRETRAINED, "x_mean": 2.0, "x_diff": 1.0, "x_lo": 0.5, "x_hi": 1.5, "x_sig": True, "x_p": 0.5},
                {"arm": "reg=none", "x_mean": 1.0},
                {"arm": "reg=fpe", "x_mean": 0.5, "x_diff": -0.5, "x_lo": lo, "x_hi": -0.1, "x_sig": lo < 0, "x_p": p}]
    lines = table_across({"a": rows(0.01, -0.9), "b": rows(0.04, -0.7)}, "x", "metric x")
    assert lines[0] == "### metric x" and lines[2] == "| arm | a | b |"
    by_arm = {line.split(" | ")[0][2:]: line for line in lines[4:-1]}
    assert list(by_arm) == [PRETRAINED, "reg=none", "reg=fpe"]
    assert by_arm["reg=none"] == "| reg=none | 1 | 1 |"
    # Holm over the 4 comparisons (2 studies × pre-trained and fpe), sorted 0.01, 0.04, 0.5, 0.5: 4·0.01, 3·0.04
    assert "p 0.01 / 0.04" in by_arm["reg=fpe"] and "p 0.04 / 0.12" in by_arm["reg=fpe"]
    assert "Δ -0.5 [-0.9, -0.1] *" in by_arm["reg=fpe"]
    assert table_across({"a": rows(0.01, -0.9)}, "missing", "t") == []
