"""Does the PDDM unit learn to score pairs when the embedding is held fixed?

Embeds the built-in training set once with a saved embedding (a `loss_probe.py --save` file),
then trains only a fresh PDDM unit with E_m (lambda = 0) on P=16 x M=4 batches of those fixed
embeddings, and prints every 100 steps how well its scores separate positive from negative pairs
of a held-out batch (ROC AUC; 0.5 = no better than chance) beside the AUC of plain negative
squared distance on the same pairs.

    python benchmarks/loss_probe.py 101 --save /tmp/triplet.pt
    python benchmarks/pddm_unit_probe.py /tmp/triplet.pt --negatives hardest
    python benchmarks/pddm_unit_probe.py /tmp/triplet.pt --negatives semi_hard
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from loss_probe import load
from sklearn.metrics import roc_auc_score

from pipeline.config import load_config
from pipeline.data.planning import MPerClassPlanner
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic
from pipeline.losses.pddm import PDDMLoss
from pipeline.models import build_model


def pair_aucs(unit, embeddings, labels) -> tuple[float, float]:
    """AUC of the unit's scores and of negative squared distance over a batch's pairs."""
    features = F.normalize(embeddings, dim=1)
    with torch.no_grad():
        scores = unit.pairwise_scores(features)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    truth = same[off_diagonal].numpy()
    by_score = roc_auc_score(truth, scores[off_diagonal].numpy())
    by_distance = roc_auc_score(truth, -torch.cdist(features, features)[off_diagonal].numpy())
    return by_score, by_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embedding", help="embedding state_dict (loss_probe.py --save)")
    parser.add_argument("--negatives", default="hardest", choices=["hardest", "semi_hard"])
    parser.add_argument("--quadruplets", default="per_positive_pair", choices=["hardest", "per_positive_pair"])
    parser.add_argument("--steps", type=int, default=301)
    parser.add_argument("--lr", type=float, default=1e-2, help="the unit's learning rate (loss.lr)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config("local", [])
    root = ensure_synthetic(config.data.cache_dir, SyntheticSpec(**vars(config.data.synthetic)))
    images, labels = load(root, config.data.train_split, config)
    model = build_model(config.model)
    model.load_state_dict(torch.load(args.embedding, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model(images[i : i + 256].float() / 255) for i in range(0, len(images), 256)])
    dense = torch.from_numpy(np.unique(labels, return_inverse=True)[1])

    torch.manual_seed(0)
    loss = PDDMLoss(config.model.embedding_dim, lam=0.0, quadruplets=args.quadruplets, negatives=args.negatives)
    optimizer = torch.optim.AdamW(loss.parameters(), lr=args.lr, weight_decay=1e-4)
    planner = MPerClassPlanner(dense.numpy(), 16, 4, 0)
    for step in range(args.steps):
        ids = planner.plan(step)
        out = loss(embeddings[ids], dense[ids])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step % 100 == 0:
            held_out = planner.plan(1_000_000 + step)
            by_score, by_distance = pair_aucs(loss.unit, embeddings[held_out], dense[held_out])
            print(f"step {step:4d}  E_m {out.stats['E_m']:.3f}  positive {out.stats['positive_score']:.3f}  "
                  f"negative {out.stats['negative_score']:.3f}  AUC score {by_score:.3f}  "
                  f"AUC distance {by_distance:.3f}", flush=True)


if __name__ == "__main__":
    main()
