"""Labels of the reported metrics, defined once for the analysis, ablation and sweep reports.

- ``METRIC_LABELS``: the specialization metrics of ``tools/analyze_specialization.py`` (the keys
  of ``runner.SCALAR_METRICS``, in that order); ``METRIC_DEFINITIONS`` adds, for some, the short
  definition the analysis report shows after the label (full definitions: docs/analysis.md);
- ``RUN_LABELS``: numbers of a training run (its ``metrics.jsonl`` and ``timing.json``) that the
  ablation reports next to them;
- ``AIMS``: the direction the specialization losses aim for ("low" or "high"; none: neither).
"""

from __future__ import annotations

METRIC_LABELS = {
    "expert_overlap": "expert overlap",
    "routing_overlap": "routing overlap, all token pairs",
    "routing_overlap_same_domain": "routing overlap, same-domain pairs",
    "routing_overlap_cross_domain": "routing overlap, cross-domain pairs",
    "routing_variance": "routing variance",
    "routing_entropy": "routing entropy (nats)",
    "max_vio": "MaxVio",
    "silhouette": "silhouette",
    "output_similarity_mean": "expert output similarity",
    "weight_similarity_mean": "expert weight similarity",
    "domain_mi": "MI(domain; expert) (nats)",
    "domain_nmi": "NMI(domain; expert)",
    "domain_mi_over_domain_entropy": "MI / H(domain)",
    "routed_output_rms": "routed output RMS",
}

METRIC_DEFINITIONS = {
    "expert_overlap": "mean cos² of a token's selected outputs",
    "routing_overlap": "|S_a∩S_b|/k",
    "routing_variance": "mean_t Var_e s_t, unbiased",
    "silhouette": "of routed outputs by expert",
    "output_similarity_mean": "mean pairwise cosine",
    "weight_similarity_mean": "mean pairwise cosine",
    "routed_output_rms": "of the unweighted expert outputs",
}

RUN_LABELS = {
    "valid_loss": "valid loss",
    "valid_ppl": "valid perplexity",
    "train_max_vio": "MaxVio (train, last 10% of steps)",
    "tokens_per_s": "throughput (tokens/s, median)",
    "train_s": "training time (s)",
    "analysis_s": "analysis time (s)",
}

LABELS = {**METRIC_LABELS, **RUN_LABELS}

AIMS = {
    "valid_loss": "low", "valid_ppl": "low", "train_max_vio": "low", "tokens_per_s": "high",
    "expert_overlap": "low", "silhouette": "high", "output_similarity_mean": "low",
    "weight_similarity_mean": "low", "routing_variance": "high", "routing_entropy": "low",
    "domain_nmi": "high", "domain_mi_over_domain_entropy": "high",
    "routing_overlap_same_domain": "high", "routing_overlap_cross_domain": "low", "max_vio": "low",
}


def described(key: str) -> str:
    """The label of a specialization metric with its short definition, if it has one."""
    definition = METRIC_DEFINITIONS.get(key)
    return f"{METRIC_LABELS[key]} ({definition})" if definition else METRIC_LABELS[key]


def heading(key: str) -> str:
    """The label of a metric with an arrow for the direction the losses aim for (↓ / ↑)."""
    return LABELS[key] + {"low": " ↓", "high": " ↑"}.get(AIMS.get(key, ""), "")
