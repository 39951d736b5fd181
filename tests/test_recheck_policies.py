"""The re-check simulation's selection rules (benchmarks/recheck_policies.py): each policy's score is
what its paper defines, so that the benchmark's verdicts on them are about the policies, not bugs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recheck_policies import (
    balanced_margin_order,
    cluster_round_robin,
    count_variance,
    disagreement,
    expected_predictive_information_gain,
    kmeans_clusters,
    typiclust_order,
)


def committee(rng: np.random.Generator, members: int, photos: int, classes: int) -> np.ndarray:
    return rng.dirichlet(np.full(classes, 0.7), size=(members, photos))


def brute_force_epig(answers: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """I(y; y*) averaged over targets, from the joint's definition, one pair at a time."""
    scores = np.zeros(answers.shape[1])
    for i in range(answers.shape[1]):
        for t in range(targets.shape[1]):
            joint = np.einsum("mc,md->cd", answers[:, i], targets[:, t]) / answers.shape[0]
            outer = np.outer(joint.sum(axis=1), joint.sum(axis=0))
            scores[i] += (joint * np.log(joint / outer)).sum()
    return scores / targets.shape[1]


def test_epig_is_the_mutual_information_between_a_label_and_the_targets_answers() -> None:
    rng = np.random.default_rng(0)
    answers, targets = committee(rng, 6, 300, 7), committee(rng, 6, 9, 7)  # 300 > one chunk of 256
    fast = expected_predictive_information_gain(answers, targets)
    assert fast.shape == (300,)
    np.testing.assert_allclose(fast, brute_force_epig(answers, targets), atol=1e-10)
    assert (fast > 0).all()


def test_a_committee_that_agrees_gains_no_information_and_shows_no_disagreement() -> None:
    rng = np.random.default_rng(1)
    one = committee(rng, 1, 40, 5)
    agreeing, agreeing_targets = np.repeat(one, 4, axis=0), np.repeat(committee(rng, 1, 10, 5), 4, axis=0)
    gain = expected_predictive_information_gain(agreeing, agreeing_targets)
    np.testing.assert_allclose(gain, 0, atol=1e-12)
    np.testing.assert_allclose(disagreement(agreeing), 0, atol=1e-12)
    assert (disagreement(committee(rng, 4, 40, 5)) > 0).all()


def test_disagreement_ranks_a_split_committee_above_one_that_is_unsure_together() -> None:
    unsure_together = np.full((2, 1, 2), 0.5)
    split = np.array([[[0.99, 0.01]], [[0.01, 0.99]]])
    assert disagreement(split)[0] > 0.5 > disagreement(unsure_together)[0] - 1e-12


def test_balanced_margin_takes_the_least_certain_of_each_answer_in_turn() -> None:
    p = np.array(
        [
            [0.90, 0.10, 0.0],  # answer 0, margin 0.80
            [0.55, 0.45, 0.0],  # answer 0, margin 0.10
            [0.20, 0.80, 0.0],  # answer 1, margin 0.60
            [0.45, 0.50, 0.05],  # answer 1, margin 0.05
            [0.10, 0.20, 0.70],  # answer 2, margin 0.50
        ]
    )
    assert balanced_margin_order(p, 4) == [1, 3, 4, 0]


def test_cluster_round_robin_takes_one_from_each_cluster_before_a_second() -> None:
    cluster = np.array([0, 0, 0, 0, 1, 1, 2])
    candidates = np.arange(7)
    chosen = cluster_round_robin(candidates, cluster, 3, np.random.default_rng(0))
    assert sorted(cluster[chosen].tolist()) == [0, 1, 2]
    assert chosen[0] == 6  # the cluster with fewest candidates first


@pytest.mark.parametrize("k", [5, 12])
def test_typiclust_takes_distinct_photos_from_clusters_no_label_covers_first(k: int) -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(30, 16)) for c in centres])  # four tight groups of 30
    labelled = list(range(0, 30, 10))  # three photos of the first group
    pool = np.setdiff1d(np.arange(len(x)), labelled)
    chosen = typiclust_order(x, labelled, pool, k, np.random.default_rng(0))
    assert len(chosen) == len(set(chosen)) == k
    assert all(0 <= i < len(pool) for i in chosen)
    # The same clustering typiclust_order draws first from the same generator.
    cluster = kmeans_clusters(x, len(labelled) + k, np.random.default_rng(0))
    uncovered = set(range(len(labelled) + k)) - set(cluster[labelled].tolist())
    first = [int(cluster[pool[i]]) for i in chosen[: len(uncovered)]]
    assert len(set(first)) == len(first) and set(first) <= uncovered


def test_count_variance_ranks_a_doubt_between_far_counts_above_one_between_neighbours() -> None:
    p = np.zeros((3, 7))
    p[0, [1, 5]] = 0.5  # 1 or 5
    p[1, [2, 3]] = 0.5  # 2 or 3: the same margin, a sixteenth of the variance
    p[2, 4] = 1.0
    np.testing.assert_allclose(count_variance(p), [4.0, 0.25, 0.0], atol=1e-12)
