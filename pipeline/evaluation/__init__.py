"""Evaluation of embeddings with the field's protocol: Recall@K, MAP@R, R-Precision, NMI."""

from pipeline.evaluation.metrics import DEFAULT_KS, SOP_KS, kmeans_nmi, retrieval_metrics

__all__ = ["DEFAULT_KS", "SOP_KS", "kmeans_nmi", "retrieval_metrics"]
