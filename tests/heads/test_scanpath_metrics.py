"""Scanpath metrics (attnzoo.heads.scanpath_metrics) on cases computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnzoo.heads.scanpath_metrics import (
    behaviour,
    behaviour_delta,
    multimatch,
    object_centres,
    scanpath_sim,
    sequence_score,
    sim,
)


@pytest.mark.parametrize(("pred", "human", "expected"), [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 2, 3, 4], [1, 3, 2, 4], 3 / 4),  # "ABCD" vs "ACBD": best alignment A-B/C-D keeps 3 matches
    ([1, 2], [3, 1, 2, 5, 6], 2 / 5),  # both of pred match, divided by the longer length 5
    ([5, 5, 5], [5], 1 / 3),  # one 5 aligns, the other two are free gaps
    ([7, 8, 9], [1, 2], 0.0),
    ([4, 1, 2, 3], [1, 2, 3, 4], 3 / 4),  # the 4 cannot match without crossing 1-2-3
])
def test_sequence_score(pred, human, expected):
    assert sequence_score(pred, human) == pytest.approx(expected)
    assert sequence_score(human, pred) == pytest.approx(expected)  # symmetric with 0/1 similarity and gap 0


def test_sequence_score_rejects_empty_and_2d():
    with pytest.raises(ValueError, match="empty"):
        sequence_score([], [1])
    with pytest.raises(ValueError, match="1-D"):
        sequence_score([[1, 2]], [1])


def test_sim_is_histogram_intersection():
    assert sim([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(0.5)  # min: .25 + .25 + 0
    # per step the probability of the fixated object: (0.3 + 0.8) / 2
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert scanpath_sim(probs, [1, 2]) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="shapes"):
        sim([1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="len"):
        scanpath_sim(probs, [1])


def test_behaviour_counts_runs_as_the_authors():
    # runs (3,3) (5) (3) (7): 3 new -> search 3; the second 3-run -> revisit 1; the repeated 3 -> refixation 1
    stats = behaviour([3, 3, 5, 3, 7], target=7)
    assert stats == pytest.approx({"target_found": 1.0, "length": 5.0, "search": 0.6, "refixation": 0.2,
                                   "revisit": 0.2})
    assert behaviour([1, 2], target=4) == pytest.approx({"target_found": 0.0, "length": 2.0, "search": 1.0,
                                                         "refixation": 0.0, "revisit": 0.0})


def test_behaviour_delta_is_the_mean_relative_error():
    pred = [behaviour([3, 3, 5, 3, 7], 7)]
    human = [behaviour([1, 2, 7], 7)]  # found 1, length 3, search 1, refixation 0, revisit 0
    # found |1-1|/1 = 0, length |5-3|/3 = 2/3, search |0.6-1|/1 = 0.4; refixation and revisit have human mean 0
    assert behaviour_delta(pred, human) == pytest.approx((0 + 2 / 3 + 0.4) / 3)
    # two scanpaths each: the means are compared, not the pairs; lengths (2+4)/2 = 3 vs (3+3)/2 = 3 -> 0 error
    pred2 = [behaviour([1, 7], 7), behaviour([1, 2, 4, 7], 7)]
    human2 = [behaviour([2, 3, 7], 7), behaviour([1, 4, 7], 7)]
    assert behaviour_delta(pred2, human2) == pytest.approx(0.0)


def test_object_centres():
    c = object_centres(2, 3, cell=(10, 20), top=5)
    assert c.shape == (6, 2)
    assert c[4].tolist() == [15.0, 35.0]  # row 1, col 1: x = 10 + 5, y = 5 + 20 + 10
    # the authors' yogurt shelf (calculate_mm.py): object 10 = row 1, col 1 -> (186 + 93, 135 + 305 + 152.5)
    assert object_centres(3, 9, (186, 305), 135)[10].tolist() == [279.0, 592.5]


SCREEN = (30, 40)  # diagonal 50


def test_multimatch_identical_and_shifted():
    a = np.array([[0, 0], [3, 0], [3, 4]])
    assert multimatch(a, a, SCREEN) == pytest.approx(dict(vector=1, direction=1, length=1, position=1))
    # the same shape 10 px lower: only the position differs, by 10 on every pair -> 1 - 10/50
    assert multimatch(a, a + [0, 10], SCREEN) == pytest.approx(dict(vector=1, direction=1, length=1, position=0.8))


def test_multimatch_transposed_path():
    # saccades a: (3,0) (0,4); b: (0,3) (4,0). M = [[|(3,-3)|, |(-1,0)|], [|(0,1)|, |(-4,4)|]] = [[4.24, 1], [1, 5.66]]
    # from (0,0) to (1,1): diagonal 5.66 < right-down 1 + 5.66, so pairs (0,0), (1,1)
    a = np.array([[0, 0], [3, 0], [3, 4]])
    b = np.array([[0, 0], [0, 3], [4, 3]])
    got = multimatch(a, b, SCREEN)
    assert got["vector"] == pytest.approx(1 - np.median([math.sqrt(18), math.sqrt(32)]) / 100)
    assert got["direction"] == pytest.approx(0.5)  # both pairs differ by pi/2
    assert got["length"] == pytest.approx(1.0)  # 3 vs 3, 4 vs 4
    assert got["position"] == pytest.approx(1 - np.median([0, math.sqrt(18)]) / 50)  # starts (3,0) vs (0,3)


def test_multimatch_alignment_takes_a_down_step():
    # a: (3,0) (3,0) (0,4); b: (6,0) (0,4). M = [[3, 5], [3, 5], [7.21, 0]]. Cheapest path (0,0)->(1,0)->(2,1), cost
    # 3 + 0 (the diagonal first costs 5): pairs a1-b1, a2-b1, a3-b2
    a = np.array([[0, 0], [3, 0], [6, 0], [6, 4]])
    b = np.array([[0, 0], [6, 0], [6, 4]])
    got = multimatch(a, b, SCREEN)
    assert got["vector"] == pytest.approx(1 - 3 / 100)  # differences 3, 3, 0
    assert got["direction"] == pytest.approx(1.0)
    assert got["length"] == pytest.approx(1 - 3 / 50)  # |3-6|, |3-6|, |4-4|
    assert got["position"] == pytest.approx(1.0)  # starts (0,0)-(0,0), (3,0)-(0,0), (6,0)-(6,0): median 0
    assert multimatch(b, a, SCREEN) == pytest.approx(got)


def test_multimatch_pads_short_scanpaths_at_pixel_one_one():
    """The authors' calculate_mm puts a scanpath of < 3 fixations into np.ones((3, 3)): the padding is (1, 1)."""
    two = np.array([[5, 5], [8, 9]])
    other = np.array([[0, 0], [0, 4], [3, 4]])
    assert multimatch(two, other, SCREEN) == pytest.approx(multimatch([[5, 5], [8, 9], [1, 1]], other, SCREEN))
    assert multimatch(two, other, SCREEN) != pytest.approx(multimatch([[5, 5], [8, 9], [8, 9]], other, SCREEN))
    # one fixation at (5, 5): saccades (5,5)->(1,1)->(1,1) on both sides, identical
    assert multimatch([[5, 5]], [[5, 5]], SCREEN) == pytest.approx(dict(vector=1, direction=1, length=1, position=1))
    with pytest.raises(ValueError, match=r"`pred` must be \(n >= 1, 2\)"):
        multimatch(other, np.zeros((3, 3)), SCREEN)


def test_multimatch_breaks_equal_cost_alignments_as_the_authors_dijkstra():
    """human saccades (0,0) (-2,-2); pred (-2,-2) (0,-2) (-2,2). M = [[2.83, 2, 2.83], [0, 2, 4]]. Three paths to
    (1,2) cost 6: via (0,1), via (1,1), via (1,0)->(1,1). The authors' Dijkstra settles (0,0), then (1,0) (d=0),
    then (0,1) before (1,1) (both d=2, lower index first), so (1,2) keeps predecessor (0,1): pairs (0,0) (0,1)
    (1,2), length differences 2.83, 2, 0 -> median 2. (scipy's Dijkstra takes (1,1): median 0.83.)"""
    human = np.array([[4, 4], [4, 4], [2, 2]])
    pred = np.array([[4, 4], [2, 2], [2, 0], [0, 2]])
    screen = (100, 100)
    got = multimatch(human, pred, screen)
    assert got["length"] == pytest.approx(1 - 2 / math.hypot(*screen), abs=1e-6)
    assert got["direction"] == pytest.approx(0.5, abs=1e-6)  # 3pi/4, pi/2, pi/2
    assert got["position"] == pytest.approx(1 - math.sqrt(8) / math.hypot(*screen), abs=1e-6)  # 0, 2.83, 4.47
