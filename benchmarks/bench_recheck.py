"""Which bins to recount to teach the model most: the active policy against random, by simulation on
real ABID photos.

The training split of ../shared/abid (the bench_accuracy split: seed 0, 60/20/20) is the pool. A small
labelled seed set starts the model; every round, N more photos are "recounted" (their recorded count
is revealed), chosen either at random or by binsight's informative policy (`recheck.queue.
informative_order`: uncertain, leaning to the middle counts, spread out over the answers), and the
model is retrained. The model is a linear head on frozen features (`--features`: DINOv2 ViT-S/14's class
token and mean patch token, or the served recipe's ImageNet Lite0; computed once through binsight's
feature cache), which trains in about a second, so the whole curve is cheap; the validation split
(which any choice of policy is made on) and the fixed test split score every round.
Several seeds give the spread.

Reported: accuracy, RMSE (posterior mean) and recall at 2/3/4 per round and policy; the labels the
active policy needs to reach the random policy's final accuracy; the accuracy gap at equal labels,
against the seed spread; for each split. PNGs of the curves.

Run: .venv/bin/python benchmarks/bench_recheck.py [--abid ../shared/abid] [--work /tmp/binsight-accuracy]
     [--features dinov2|lite0] [--learner adamw|l2] [--seeds 5] [--start 200] [--step 100] [--rounds 12]
     [--explore-share 0.25]
     [--policies random,active,margin,badge,committee,density,typiclust-active,balanced,views,disagreement,
      cluster-margin,cluster-active,active-explore,epig,variance,variance-active]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from recheck_policies import (
    badge_order,
    balanced_margin_order,
    cluster_round_robin,
    count_variance,
    disagreement,
    expected_predictive_information_gain,
    kmeans_clusters,
    margins,
    typicality,
    typiclust_order,
)

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
NUM_CLASSES = 7


# The learner's frozen features: DINOv2 ViT-S/14 (class token and mean patch token, 768), or the
# served recipe's ImageNet Lite0 at its input (1,280), the embedding `binsight serve` computes.
FEATURES = {
    "dinov2": {"arch": "dinov2_small", "image_size": 224, "image_width": 308},
    "lite0": {"arch": "efficientnet_lite0", "image_size": 224, "image_width": 304},
}


def learner_features(work: Path, data: Path, split: str, features: str, view: str = "o") -> np.ndarray:
    """A frozen backbone's pooled features of every photo of a split in one view (as is, or "h" for its
    mirror image), through binsight's feature cache."""
    target = work / f"{features}-pooled-{split}{'' if view == 'o' else '-' + view}.npy"
    if target.is_file():
        return np.load(target)
    from binsight.data.split import load_split
    from binsight.models.factory import build_model
    from binsight.training.cached import pooled_features, split_backbone
    from binsight.training.config import TrainConfig
    from binsight.training.hardware import Precision

    config = TrainConfig(data=data, out=work / "unused", num_classes=NUM_CLASSES, **FEATURES[features])
    model = build_model(config.arch, config.head, NUM_CLASSES, True, None, 0.0, config.input_hw).eval()
    precision = Precision(config, torch.device("cpu"))
    rows = load_split(data, split)
    pooled = pooled_features(
        config, split_backbone(model.backbone), split, rows, precision, view=view
    ).numpy()
    np.save(target, pooled)
    return pooled


LEARNERS = ("adamw", "l2")
L2_C = 3e-4  # the "l2" learner's inverse strength, per photo


def train_head(x: np.ndarray, y: np.ndarray, seed: int, learner: str, epochs: int = 150) -> torch.nn.Module:
    """Multinomial logistic regression on standardised features: "adamw" (full batch, 150 steps, weight
    decay and label smoothing: it still spreads its answers over the middle counts), or "l2" (L-BFGS to
    the optimum with an L2 penalty of strength 1/(2 C n), C = 3e-4 chosen on validation for the Lite0
    features: the better counter, mostly 1 or 5)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], NUM_CLASSES)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    if learner == "l2":
        lbfgs = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(inputs), targets)
            loss = loss + head.weight.square().sum() / (2 * L2_C * len(x))
            loss.backward()
            return loss

        lbfgs.step(closure)
        return head.eval()
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(inputs), targets, label_smoothing=0.05).backward()
        optimizer.step()
    return head.eval()


def probabilities(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(x)), dim=1).numpy()


def scores(p: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    targets = np.minimum(counts, NUM_CLASSES - 1)
    predicted = p.argmax(axis=1)
    mean = p @ np.arange(NUM_CLASSES)
    out = {
        "accuracy": float((predicted == targets).mean()),
        "rmse": float(np.sqrt(((mean - counts.clip(max=NUM_CLASSES - 1)) ** 2).mean())),
    }
    for k in (2, 3, 4):
        out[f"recall_{k}"] = float((predicted[targets == k] == k).mean())
    return out


def committee_answers(
    x: np.ndarray, y: np.ndarray, pool: np.ndarray, seed: int, learner: str, members: int = 5
) -> np.ndarray:
    """The answers of heads trained on bootstrap resamples of the labels (query by committee):
    (member, photo, class)."""
    rng = np.random.default_rng(seed)
    answers = []
    for member in range(members):
        sample = rng.choice(len(x), size=len(x), replace=True)
        answers.append(probabilities(train_head(x[sample], y[sample], seed + member, learner, 100), pool))
    return np.stack(answers)


EPIG_MEMBERS = 20  # bootstrap heads: EPIG's joint predictive needs more samples than a vote does
EPIG_TARGETS = 500  # unlabelled pool photos standing in for the photos the model will be asked about


CLUSTERS = 100  # k-means clusters of the pool for cluster-margin: about one per recount of a round
CANDIDATES = 3  # cluster-margin looks at this many times a round's recounts, least certain first


# "active" is the product (`binsight recheck load --predictions`); the others are the usual baselines
# from the active-learning literature, measured so that the product's choice is one among them.
POLICIES = (
    "random",
    "active",
    "margin",
    "badge",
    "committee",
    "density",
    "typiclust-active",
    "balanced",
    "views",
    "disagreement",
    "cluster-margin",
    "cluster-active",
    "active-explore",
    "epig",
    "variance",
    "variance-active",
)
# Labels below which typiclust-active and variance-active take their first rule, then the product's order.
EARLY_UNTIL = 600


def choose(
    policy: str,
    head: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    labelled: list[int],
    pool: np.ndarray,
    k: int,
    rng: np.random.Generator,
    learner: str,
    mirrored: np.ndarray | None = None,
    explore_share: float = 0.25,
) -> np.ndarray:
    from binsight.recheck.queue import informative_order

    def pool_committee(members: int = 5) -> np.ndarray:
        """A bootstrap committee of the labelled photos, answering on the pool."""
        seed = int(rng.integers(1 << 30))
        return committee_answers(x[labelled], y[labelled], x[pool], seed, learner, members)

    if policy == "random":
        return rng.choice(pool, size=k, replace=False)
    if policy == "committee":  # the product's order on a bootstrap committee's mean answer
        return pool[np.asarray(informative_order(pool_committee().mean(axis=0), k=k))]
    if policy == "disagreement":  # query by committee, by how much the members disagree
        return pool[np.argsort(-disagreement(pool_committee()), kind="stable")[:k]]
    if policy == "epig":  # expected predictive information gain on photos drawn from the pool
        answers = pool_committee(EPIG_MEMBERS)
        targets = answers[:, rng.choice(len(pool), size=min(EPIG_TARGETS, len(pool)), replace=False)]
        return pool[np.argsort(-expected_predictive_information_gain(answers, targets), kind="stable")[:k]]
    if policy == "active-explore":  # the product's order for most of a round, the rest at random
        # (epsilon-greedy), against the sampling bias of choosing only by the model's own doubt
        explore = rng.choice(pool, size=round(explore_share * k), replace=False)
        rest = np.setdiff1d(pool, explore)
        exploit = rest[np.asarray(informative_order(probabilities(head, x[rest]), k=k - len(explore)))]
        return np.concatenate([exploit, explore])
    if policy == "typiclust-active" and len(labelled) < EARLY_UNTIL:
        return pool[np.asarray(typiclust_order(x, labelled, pool, k, rng))]
    p = probabilities(head, x[pool])
    if policy == "views":  # the views' committee: the product's order on the mean answer of the photo
        # and its mirror image, so that views that disagree flatten the answer (test-time augmentation)
        assert mirrored is not None
        order = informative_order((p + probabilities(head, mirrored[pool])) / 2, k=k)
    elif policy == "variance" or (policy == "variance-active" and len(labelled) < EARLY_UNTIL):
        order = list(np.argsort(-count_variance(p), kind="stable")[:k])  # the widest spread as a count
    elif policy in ("active", "typiclust-active", "variance-active"):
        order = informative_order(p, k=k)
    elif policy == "density":  # information density (after Settles & Craven, 2008): the product's
        # order among the more typical half of the pool, away from outliers no other photo resembles
        typical = typicality(x)[pool]
        dense = np.flatnonzero(typical >= np.median(typical))
        order = list(dense[np.asarray(informative_order(p[dense], k=k))])
    elif policy == "balanced":
        order = balanced_margin_order(p, k)
    elif policy in ("cluster-margin", "cluster-active"):  # the least certain, spread over the embedding's
        # clusters: by margin (Cluster-Margin as published) or by the product's order
        n = min(CANDIDATES * k, len(pool))
        candidates = (
            np.argsort(margins(p))[:n]
            if policy == "cluster-margin"
            else np.asarray(informative_order(p, k=n))
        )
        cluster = kmeans_clusters(x, CLUSTERS, np.random.default_rng(0))[pool]
        order = cluster_round_robin(candidates, cluster, k, rng)
    elif policy == "margin":
        order = list(np.argsort(margins(p))[:k])
    elif policy == "badge":
        order = badge_order(p, x[pool], k, rng)
    else:
        raise ValueError(f"unknown policy {policy!r}: choose from {', '.join(POLICIES)}")
    return pool[np.asarray(order)]


def simulate(
    x: np.ndarray,
    y: np.ndarray,
    scored: dict[str, tuple[np.ndarray, np.ndarray]],
    policy: str,
    seed: int,
    args: argparse.Namespace,
    mirrored: np.ndarray | None = None,
) -> dict[str, list[dict[str, float]]]:
    """One seed's curve per scored split (features, recorded counts). Every policy starts from the
    same seed set of its seed."""
    rng = np.random.default_rng(seed)
    labelled = list(rng.choice(len(x), size=args.start, replace=False))
    curves: dict[str, list[dict[str, float]]] = {split: [] for split in scored}
    for round_ in range(args.rounds + 1):
        head = train_head(x[labelled], y[labelled], seed, args.learner)
        for split, (features, counts) in scored.items():
            curves[split].append({"labels": len(labelled), **scores(probabilities(head, features), counts)})
        if round_ == args.rounds:
            break
        pool = np.setdiff1d(np.arange(len(x)), labelled)
        labelled += list(
            choose(
                policy, head, x, y, labelled, pool, args.step, rng, args.learner, mirrored, args.explore_share
            )
        )
    return curves


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_accuracy import add_data_options, prepare_data

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_options(parser)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--step", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--features", choices=sorted(FEATURES), default="dinov2", help="the learner's features"
    )
    parser.add_argument(
        "--explore-share",
        type=float,
        default=0.25,
        help="active-explore: the share of a round taken at random",
    )
    parser.add_argument("--learner", choices=LEARNERS, default="adamw", help="how the linear head is fitted")
    parser.add_argument(
        "--policies",
        default="random,active",
        help=f"comma-separated, from {', '.join(POLICIES)}; random first",
    )
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if policies[:1] != ["random"] or not set(policies) <= set(POLICIES):
        parser.error(f"--policies must start with random and name only {', '.join(POLICIES)}")
    if not (args.abid / "labels.csv").is_file():
        print(
            f"SKIP: no real ABID photos at {args.abid} (labels.csv missing); pass --abid DIR", file=sys.stderr
        )
        return 0
    from binsight.utils.io import read_csv

    data = prepare_data(args.abid, args.work)["all"]
    x_train = learner_features(args.work, data, "train", args.features)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train = (x_train - mean) / std
    y = np.minimum([int(r["count"]) for r in read_csv(data / "splits" / "train.csv")], NUM_CLASSES - 1)
    # Validation decides (the policy, its knobs); the test split reports.
    scored = {
        split: (
            (learner_features(args.work, data, split, args.features) - mean) / std,
            np.array([int(r["count"]) for r in read_csv(data / "splits" / f"{split}.csv")]),
        )
        for split in ("val", "test")
    }
    # The pool's mirror images, for the views' committee only (one more pass of the backbone).
    mirrored = None
    if "views" in policies:
        mirrored = (learner_features(args.work, data, "train", args.features, view="h") - mean) / std
    runs = {
        policy: [
            simulate(x_train, y.astype(np.int64), scored, policy, s, args, mirrored)
            for s in range(args.seeds)
        ]
        for policy in policies
    }
    for split in scored:
        report({policy: [run[split] for run in seeds] for policy, seeds in runs.items()}, split, args)
    return 0


def report(curves: dict[str, list[list[dict[str, float]]]], split: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [point["labels"] for point in curves["random"][0]]
    summary: dict[str, dict[str, np.ndarray]] = {}
    for policy, runs in curves.items():
        summary[policy] = {
            key: np.array([[point[key] for point in run] for run in runs])
            for key in ("accuracy", "rmse", "recall_2", "recall_3", "recall_4")
        }
    others = [policy for policy in summary if policy != "random"]
    print(f"\n{args.seeds} seeds; start {args.start} labels, +{args.step} per round; {split} split")
    print(
        "| labels | random acc | "
        + " | ".join(f"{p} acc | gap (pt)" for p in others)
        + " | random RMSE | "
        + " | ".join(f"{p} RMSE | {p} recall 2/3/4" for p in others)
        + " |"
    )
    print("|" + " --- |" * (3 + 4 * len(others)))
    for i, n in enumerate(labels):
        r = summary["random"]
        cells = [f"{n}", f"{r['accuracy'][:, i].mean():.3f} ± {r['accuracy'][:, i].std():.3f}"]
        for policy in others:
            a = summary[policy]["accuracy"][:, i]
            cells += [
                f"{a.mean():.3f} ± {a.std():.3f}",
                f"{100 * (a.mean() - r['accuracy'][:, i].mean()):+.1f}",
            ]
        cells.append(f"{r['rmse'][:, i].mean():.3f}")
        for policy in others:
            a = summary[policy]
            recall = "/".join(f"{a[key][:, i].mean():.2f}" for key in ("recall_2", "recall_3", "recall_4"))
            cells += [f"{a['rmse'][:, i].mean():.3f}", recall]
        print("| " + " | ".join(cells) + " |")
    final = summary["random"]["accuracy"][:, -1].mean()
    print(f"\nrandom's final accuracy {final:.3f} at {labels[-1]} labels; reached by")
    for policy in others:
        mean = summary[policy]["accuracy"].mean(axis=0)
        reached = next((labels[i] for i, v in enumerate(mean) if v >= final), None)
        if reached is None:
            print(f"  {policy}: more than {labels[-1]} labels")
        else:
            print(f"  {policy}: {reached} labels ({100 * reached / labels[-1]:.0f}% of the labels)")
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for policy, colour in zip(summary, ("C0", "C3", "C2", "C1", "C4", "C5"), strict=False):
        for axis, key in zip(axes, ("accuracy", "recall_3"), strict=True):
            values = summary[policy][key]
            axis.plot(labels, values.mean(axis=0), color=colour, label=policy)
            axis.fill_between(labels, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.15)
            axis.set_xlabel("recounted labels")
            axis.set_ylabel(key.replace("_", " at "))
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"Recounts chosen at random vs by each policy ({split} split, min-max over seeds)")
    figure.tight_layout()
    out = args.work / f"recheck_simulation_{args.features}_{args.learner}_{split}.png"
    figure.savefig(out, dpi=110)
    (args.work / f"recheck_simulation_{args.features}_{args.learner}_{split}.json").write_text(
        json.dumps({p: [[dict(pt) for pt in run] for run in runs] for p, runs in curves.items()}, indent=1)
    )
    print(f"curves: {out}")


if __name__ == "__main__":
    sys.exit(main())
