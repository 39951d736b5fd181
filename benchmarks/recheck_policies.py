"""The re-check simulation's selection rules: scores and orders over a pool of photos, from a model's
answers (photo, class), a committee's answers (member, photo, class) or the frozen embedding. Pure
functions of arrays, so that each can be checked on its own; `bench_recheck.py` trains the learner and
calls them."""

from __future__ import annotations

import numpy as np
import torch


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)


def disagreement(answers: np.ndarray) -> np.ndarray:
    """The committee's mean KL divergence from its consensus (McCallum & Nigam, 1998), which equals the
    mutual information between answer and member (BALD's score): high where the members disagree, not
    where each of them is unsure, so photos that are ambiguous to everyone (a noisy record, an item
    hidden behind the strap) are not what it asks for."""
    return entropy(answers.mean(axis=0)) - entropy(answers).mean(axis=0)


def expected_predictive_information_gain(answers: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """EPIG (Bickford Smith et al., AISTATS 2023): how much a photo's label would tell about the answers
    on the photos the model will be asked about, I(y; y*) averaged over target photos x*, from a
    committee's answers on the candidates (member, photo, class) and on the targets (member, target,
    class). Unlike the committee's disagreement (BALD), an outlier that resembles no target photo
    scores low however much the members disagree about it.
    I(y; y*) = H(y) + H(y*) - H(y, y*), the joint being the members' mean of p(y | x) p(y* | x*)."""
    members, n, classes = answers.shape
    flat_targets = targets.reshape(members, -1)
    joint_entropy = np.empty(n)
    for start in range(0, n, 256):  # chunks keep the (photo, class, target, class) joint in memory
        chunk = answers[:, start : start + 256].reshape(members, -1)
        joint = (chunk.T @ flat_targets / members).reshape(-1, classes, targets.shape[1], classes)
        joint_entropy[start : start + 256] = (
            -(joint * np.log(np.clip(joint, 1e-12, 1.0))).sum(axis=(1, 3)).mean(axis=1)
        )
    return entropy(answers.mean(axis=0)) + entropy(targets.mean(axis=0)).mean() - joint_entropy


def badge_order(p: np.ndarray, features: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """BADGE (Ash et al., 2020): k-means++ seeding on the last layer's gradient embeddings, whose
    length carries the uncertainty and whose direction carries the photo."""
    gradient = p.copy()
    gradient[np.arange(len(p)), p.argmax(axis=1)] -= 1.0
    embedding = (gradient[:, :, None] * features[:, None, :]).reshape(len(p), -1)
    chosen = [int(np.argmax((embedding**2).sum(axis=1)))]
    distance = ((embedding - embedding[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        chosen.append(int(rng.choice(len(p), p=distance / distance.sum())))
        distance = np.minimum(distance, ((embedding - embedding[chosen[-1]]) ** 2).sum(axis=1))
    return chosen


def typicality(x: np.ndarray, k: int = 20) -> np.ndarray:
    """How dense the embedding is around each photo: the inverse mean cosine distance to its k nearest
    neighbours (TypiClust's typicality)."""
    z = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    nearest = (z @ z.T).topk(k + 1, dim=1).values[:, 1:]
    return (1.0 / (1.0 - nearest).clamp(min=1e-6).mean(dim=1)).numpy()


def kmeans_clusters(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Each photo's cluster among `n` k-means clusters of the normalised embedding (Lloyd's, 30
    iterations, from a random sample of photos)."""
    z = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()
    centres = z[torch.from_numpy(rng.choice(len(x), size=n, replace=False))]
    for _ in range(30):
        assign = torch.cdist(z, centres).argmin(dim=1)
        for c in range(n):
            if bool((assign == c).any()):
                centres[c] = z[assign == c].mean(dim=0)
    return torch.cdist(z, centres).argmin(dim=1).numpy()


def typiclust_order(
    x: np.ndarray, labelled: list[int], pool: np.ndarray, k: int, rng: np.random.Generator
) -> list[int]:
    """TypiClust (Hacohen et al., ICML 2022; the low-budget regime): k-means into |labelled| + k
    clusters of the normalised embedding, then the most typical pool photo of each uncovered cluster,
    largest cluster first. Returns positions in `pool`."""
    n_clusters = min(len(labelled) + k, 500)
    cluster = kmeans_clusters(x, n_clusters, rng)
    typical = typicality(x)
    covered = set(cluster[labelled].tolist())
    sizes = np.bincount(cluster, minlength=n_clusters)
    position = {int(index): i for i, index in enumerate(pool)}
    by_cluster = [
        sorted((i for i in pool if cluster[i] == c), key=lambda i: -typical[i]) for c in range(n_clusters)
    ]
    order = sorted(range(n_clusters), key=lambda c: (c in covered, -sizes[c]))
    chosen: list[int] = []
    while len(chosen) < k:  # a round over the clusters takes the next most typical photo of each
        for c in order:
            if by_cluster[c] and len(chosen) < k:
                chosen.append(position[int(by_cluster[c].pop(0))])
    return chosen


def cluster_round_robin(
    candidates: np.ndarray, cluster: np.ndarray, k: int, rng: np.random.Generator
) -> list[int]:
    """Cluster-Margin's sampling (Citovsky et al., NeurIPS 2021): the candidates grouped by cluster,
    the clusters with fewest candidates first, one random candidate from each in turn until `k`."""
    groups = [
        list(rng.permutation(candidates[cluster[candidates] == c])) for c in np.unique(cluster[candidates])
    ]
    groups.sort(key=len)
    chosen: list[int] = []
    while len(chosen) < k:
        for group in groups:
            if group and len(chosen) < k:
                chosen.append(int(group.pop()))
    return chosen


def margins(p: np.ndarray) -> np.ndarray:
    """The gap between each photo's two likeliest answers: small is uncertain."""
    top2 = np.sort(p, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def count_variance(p: np.ndarray) -> np.ndarray:
    """The variance of the answer as a count, Var[c] = E[c^2] - E[c]^2 over the classes: an ordinal
    uncertainty, under which a doubt between 1 and 5 outranks one between 2 and 3 (margin ranks them
    alike, though the first costs a squared error sixteen times as large)."""
    classes = np.arange(p.shape[1])
    mean = p @ classes
    return p @ classes**2 - mean**2


def balanced_margin_order(p: np.ndarray, k: int) -> list[int]:
    """Smallest margin first, taken in turn from each predicted answer: class-balanced uncertainty."""
    margin = margins(p)
    answers = p.argmax(axis=1)
    groups = [
        list(g[np.argsort(margin[g])])
        for g in (np.flatnonzero(answers == c) for c in range(p.shape[1]))
        if len(g)
    ]
    chosen: list[int] = []
    while len(chosen) < k:
        for group in groups:
            if group and len(chosen) < k:
                chosen.append(int(group.pop(0)))
    return chosen
