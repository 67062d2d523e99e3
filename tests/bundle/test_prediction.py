import numpy as np

from hematoscope.bundle.prediction import LOW_CONFIDENCE, Prediction, SkippedFile


def _pred():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25]])
    return Prediction(["a", "b", "c"], probs, ["x", "y", "z"], np.full(3, np.nan), np.zeros(3, bool),
                      np.array([False, False, True]), [None, None, LOW_CONFIDENCE], [SkippedFile("bad.jpg", "truncated file")])


def test_top_k_and_records():
    p = _pred()
    assert p.predicted == ["a", "c", "a"]
    assert p.top_k(2)[1] == [("c", 0.8), ("a", 0.1)] or p.top_k(2)[1][0] == ("c", 0.8)
    recs = p.records(2)
    assert len(recs) == 4 and recs[-1]["error"] == "truncated file"
    assert recs[2]["abstain"] and recs[2]["abstain_reason"] == LOW_CONFIDENCE


def test_differential_counts_abstentions_apart():
    d = _pred().differential()
    assert d.counts == {"a": 1, "b": 0, "c": 1}
    assert d.abstained == 1 and d.skipped == 1 and d.total == 4
    assert d.percent()["a"] == 50.0


def test_replace_take_and_concat_carry_views_and_framing():
    p = _pred()
    p.views, p.framing = np.array([1, 1, 1], np.int8), np.ones(3)
    other = Prediction(["a", "b", "c"], np.array([[0.1, 0.8, 0.1]]), ["z"], np.array([2.5]), np.array([True]),
                       np.array([True]), ["unlike training data"], [], np.array([4], np.int8), np.array([0.6]))
    p.replace(np.array([2]), other)
    assert p.predicted == ["a", "c", "b"] and p.abstain_reason[2] == "unlike training data"
    assert p.views.tolist() == [1, 1, 4] and p.framing.tolist() == [1.0, 1.0, 0.6] and p.ood_flag.tolist()[2]
    assert [r.get("framing") for r in p.records()[:3]] == [1.0, 1.0, 0.6]
    assert p.take(np.array([2, 0])).framing.tolist() == [0.6, 1.0]
    both = Prediction.concat([p, p.take(np.array([1]))])
    assert both.framing.tolist() == [1.0, 1.0, 0.6, 1.0] and both.views.tolist() == [1, 1, 4, 1]
    assert Prediction.concat([p, _pred()]).framing is None  # one part did not record it
    plain = _pred().records()[0]  # no framing search: the same keys, the run's own framing
    assert (plain["framing"], plain["recolour"]) == (1.0, "") and set(plain) >= {"views", "framing", "recolour"}
