"""Quality profiles: format, interpolation, synthetic default."""

from __future__ import annotations

import json

import pytest

from services.scheduler.decide.quality import (
    QualityPoint,
    QualityProfile,
    QualityProfileError,
    load_or_synthetic,
    synthetic_accuracy,
    synthetic_profile,
)


def _profile() -> QualityProfile:
    pts = tuple(QualityPoint(t, f, r, 0.1 * t / 10 + 0.5 * f - 0.1 * r)
                for t in (10, 20) for f in (0.0, 0.5, 1.0) for r in (0.0, 0.5))
    return QualityProfile({"L+S": {"base": pts, "bob": tuple(QualityPoint(p.steps, p.split_fraction,
                                                                           p.merge_ratio, p.accuracy / 2) for p in pts)}})


def test_interpolation_is_exact_at_nodes_and_linear_between():
    p = _profile()
    assert p.accuracy(10, 0.5, 0.0) == pytest.approx(0.1 + 0.25)
    assert p.accuracy(15, 0.25, 0.25) == pytest.approx(0.15 + 0.125 - 0.025)  # the data is affine
    assert p.accuracy(40, 2.0, 0.0) == pytest.approx(0.2 + 0.5)  # clamped outside the grid
    assert p.accuracy(10, 0.5, 0.0, user="bob") == pytest.approx(0.175)
    assert p.accuracy(10, 0.5, 0.0, user="nobody") == p.accuracy(10, 0.5, 0.0)  # falls back to base


def test_incomplete_grid_fills_from_nearest_point():
    pts = tuple(QualityPoint(t, f, 0.0, a) for t, f, a in
                [(10, 0.0, 0.2), (20, 0.0, 0.4), (30, 0.0, 0.6), (20, 1.0, 0.7), (30, 1.0, 0.9)])
    p = QualityProfile({"p": {"base": pts}})
    assert p.accuracy(10, 1.0, 0.0) == pytest.approx(0.7)  # (10, 1) was not measured: nearest is (20, 1)
    assert p.accuracy(15, 1.0, 0.0) == pytest.approx(0.7)
    assert p.accuracy(25, 0.5, 0.0) == pytest.approx((0.4 + 0.6 + 0.7 + 0.9) / 4)


def test_json_round_trip_and_errors(tmp_path):
    p = synthetic_profile()
    path = tmp_path / "q.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["synthetic"] is True and set(data["pairs"]["large+small"]["users"]) == {"base", "personalized"}
    back = QualityProfile.load(path)
    assert back.accuracy(17, 0.3, 0.25, "personalized") == pytest.approx(p.accuracy(17, 0.3, 0.25, "personalized"))
    with pytest.raises(QualityProfileError, match="malformed"):
        QualityProfile.from_dict({"pairs": {"x": {"users": {"base": {}}}}})
    with pytest.raises(QualityProfileError, match="no pairs"):
        QualityProfile.from_dict({"pairs": {}})
    with pytest.raises(QualityProfileError, match="no pair"):
        p.accuracy(10, 0.5, 0.0, pair="other+pair")
    path.write_text("{not json")
    with pytest.raises(QualityProfileError, match="not JSON"):
        QualityProfile.load(path)


def test_synthetic_profile_has_the_intended_shape():
    p = synthetic_profile()
    assert p.synthetic
    for f in (0.0, 0.5, 1.0):
        assert p.accuracy(10, f, 0) < p.accuracy(15, f, 0) < p.accuracy(25, f, 0)  # more steps help
    assert p.accuracy(20, 0.0, 0) < p.accuracy(20, 0.5, 0) < p.accuracy(20, 1.0, 0)  # the large model helps
    # a personal style needs >= 40% of the steps on the device
    assert p.accuracy(20, 0.6, 0, "personalized") == pytest.approx(p.accuracy(20, 0.6, 0))
    assert p.accuracy(20, 1.0, 0, "personalized") < p.accuracy(20, 0.5, 0, "personalized")
    # merging costs a little
    loss = p.accuracy(20, 0.5, 0.0) - p.accuracy(20, 0.5, 0.75)
    assert 0 < loss < 0.1
    assert synthetic_accuracy(20, 0.5, 0.0, False) == pytest.approx(p.accuracy(20, 0.5, 0.0))


def test_load_or_synthetic(tmp_path):
    assert load_or_synthetic(None).synthetic
    assert load_or_synthetic(tmp_path / "absent.json").synthetic
    _profile().save(tmp_path / "real.json")
    assert not load_or_synthetic(tmp_path / "real.json").synthetic
