"""Pure metric functions of expert specialization (torch only, no process groups).

Notation: T tokens, E experts, top-k routing, D document domains, H hidden size.
``routing_map`` [T, E] bool marks the experts each token is sent to; ``scores`` [T, E] are the
routing scores of all experts before top-k (softmax probabilities, or sigmoid gates);
``outputs`` [T, E, H] are the *unweighted* outputs of every expert on the same T tokens (the FFN
output before the gate multiplies it); ``table`` [D, E] counts (token, selected expert)
assignments per domain.

Load and balance
    load_e   = (number of tokens that selected expert e) / (k T), so sum_e load_e = 1
    MaxVio   = max_e |n_e - mean_e n_e| / mean_e n_e  on the counts n_e   (0 = perfectly balanced)
Routing confidence
    entropy  = mean_t -sum_e p_te log p_te,  p_t = s_t / sum_e s_te        (log E = uniform scores)
    variance = mean_t Var_e(s_t), unbiased over the E experts as torch.var (= -L_v)
Expert overlap (two readings, both reported)
    expert_overlap  (representation, the paper's sense: the projection overlap that L_o reduces)
        = mean over tokens t and ordered pairs i != j of t's selected experts of
          cos^2(x_ti, x_tj): the pairwise L_o of Eq. 6 on unit-normalized outputs, scale-free.
          0 = the k outputs are mutually orthogonal, 1 = collinear (identical experts).
    routing_overlap (routing sets) = mean over ordered pairs of distinct tokens (a, b) of
          |S_a ∩ S_b| / k.  Computed exactly from counts: sum_e n_e (n_e - 1) / (k T (T - 1)).
          Over *all* pairs it depends on the load only (k/E for any balanced routing, specialized
          or not), so it is also reported for pairs of tokens of the same domain and of different
          domains: a domain-specialized router has same-domain overlap 1 and cross-domain 0,
          a domain-blind one k/E for both.
Domain specialization
    joint P(d, e) = table / sum(table) over (token, selected expert) assignments;
    MI = sum P(d,e) log(P(d,e) / (P(d) P(e)));  NMI = 2 MI / (H(D) + H(E))  (arithmetic, as
    sklearn's default), and MI / H(D) (1 = the selected expert always identifies the domain;
    with k > 1 and disjoint per-domain expert sets NMI stays below 1, this ratio reaches 1).
Representations
    silhouette of the routed outputs x_te labelled by expert e (cosine distance 1 - cos by
    default, euclidean optional); clusters of one point score 0 (sklearn's convention).
    output similarity S_ef = mean_t cos(x_te, x_tf) on the same tokens; weight similarity
    W_ef = cos(w_e, w_f) with w_e expert e's flattened fc1 and fc2 weights. Their "mean" is the
    mean over the E (E - 1) / 2 pairs e < f.
    routed output RMS = sqrt(mean over (t, selected e) of ||x_te||^2 / H): the scale of the
    unweighted routed outputs. L_o is not scale-free (it is ~ overlap x ||x||^2), so it can be
    lowered by shrinking the outputs as well as by turning them apart; this shows which.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TINY = 1e-30


def load_counts(routing_map: torch.Tensor) -> torch.Tensor:
    """[E] float64 number of tokens routed to each expert."""
    return routing_map.sum(0).double()


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """[E] share of all assignments per expert (sums to 1)."""
    counts = counts.double()
    return counts / counts.sum().clamp_min(_TINY)


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max_e |n_e - mean| / mean (0 = perfectly balanced)."""
    counts = counts.double()
    mean = counts.mean()
    return float((counts - mean).abs().max() / mean.clamp_min(_TINY))


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores normalized to a distribution over experts per token (float64)."""
    p = scores.double()
    return p / p.sum(-1, keepdim=True).clamp_min(_TINY)


def routing_entropy_per_token(scores: torch.Tensor) -> torch.Tensor:
    """[T] entropy (nats) of each token's normalized routing scores."""
    p = normalized_scores(scores)
    return -(p * p.clamp_min(_TINY).log()).sum(-1)


def routing_variance_per_token(scores: torch.Tensor) -> torch.Tensor:
    """[T] unbiased variance (torch.var) of each token's scores across experts, in float64."""
    return torch.var(scores.double(), dim=-1)


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of a probability vector."""
    p = p.double().flatten()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def mutual_information(table: torch.Tensor) -> dict[str, float]:
    """MI of the domain x expert assignment table, with its normalizations.

    Args:
        table: [D, E] counts of (token, selected expert) assignments per domain.

    Returns:
        ``mi`` (nats), ``nmi`` = 2 MI / (H(D) + H(E)), ``mi_over_domain_entropy`` = MI / H(D),
        ``domain_entropy`` H(D), ``expert_entropy`` H(E). NaN normalizations when undefined
        (a single domain, or no assignment at all).
    """
    joint = table.double()
    total = joint.sum()
    if total <= 0:
        nan = float("nan")
        return dict(mi=nan, nmi=nan, mi_over_domain_entropy=nan, domain_entropy=nan,
                    expert_entropy=nan)
    joint = joint / total
    pd, pe = joint.sum(1), joint.sum(0)
    outer = pd[:, None] * pe[None, :]
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / outer[nz]).log()).sum())
    mi = max(mi, 0.0)
    hd, he = entropy(pd), entropy(pe)
    return dict(
        mi=mi,
        nmi=2 * mi / (hd + he) if hd + he > 0 else float("nan"),
        mi_over_domain_entropy=mi / hd if hd > 0 else float("nan"),
        domain_entropy=hd,
        expert_entropy=he,
    )


def routing_overlap(table: torch.Tensor, tokens_per_domain: torch.Tensor, topk: int
                    ) -> dict[str, float]:
    """Mean |S_a ∩ S_b| / k over pairs of distinct tokens: all pairs, same-domain, cross-domain.

    Exact (no sampling): the pairs (a, b), a != b, that share expert e number n_e (n_e - 1).

    Args:
        table: [D, E] assignment counts per domain (D = 1 without domain labels).
        tokens_per_domain: [D] number of tokens per domain.
        topk: k.
    """
    n = table.double()
    t = tokens_per_domain.double()
    per_expert = n.sum(0)
    total = t.sum()
    nan = float("nan")

    def ratio(shared, pairs):
        return float(shared / (topk * pairs)) if pairs > 0 else nan

    all_pairs = ratio((per_expert * (per_expert - 1)).sum(), total * (total - 1))
    same = ratio((n * (n - 1)).sum(), (t * (t - 1)).sum())
    cross = ratio((per_expert.square() - n.square().sum(0)).sum(), total.square() - t.square().sum())
    return dict(all=all_pairs, same_domain=same, cross_domain=cross)


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[N, N] float64 cosine similarities of the rows of ``vectors`` [N, D]."""
    v = F.normalize(vectors.double(), dim=-1, eps=1e-12)
    return v @ v.T


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the entries above the diagonal of a square matrix (pairs e < f)."""
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    rows, cols = torch.triu_indices(n, n, 1)
    return float(matrix[rows, cols].double().mean())


def expert_output_cosines(outputs: torch.Tensor, routing_map: torch.Tensor,
                          chunk: int = 256) -> tuple[torch.Tensor, float]:
    """Output similarity matrix of all experts on the same tokens, and the representation overlap.

    Args:
        outputs: [T, E, H] unweighted outputs of every expert on T tokens.
        routing_map: [T, E] bool, the experts each token was routed to.
        chunk: tokens per batched Gram computation (memory T_chunk x E x E).

    Returns:
        (similarity [E, E] float64 = mean_t cos(x_te, x_tf),
         expert_overlap = mean over tokens and ordered pairs i != j of selected experts of
         cos^2(x_ti, x_tj); NaN if no token has two selected experts).
    """
    num_tokens, num_experts, _ = outputs.shape
    sim = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=outputs.device)
    overlap_sum = torch.zeros((), dtype=torch.float64, device=outputs.device)
    overlap_pairs = torch.zeros((), dtype=torch.float64, device=outputs.device)
    eye = torch.eye(num_experts, dtype=torch.bool, device=outputs.device)
    for start in range(0, num_tokens, chunk):
        x = F.normalize(outputs[start:start + chunk].double(), dim=-1, eps=1e-12)
        cos = x @ x.transpose(1, 2)  # [t, E, E]
        sim += cos.sum(0)
        sel = routing_map[start:start + chunk].double()
        pair_mask = (sel[:, :, None] * sel[:, None, :]).masked_fill(eye, 0.0)
        overlap_sum += (cos.square() * pair_mask).sum()
        overlap_pairs += pair_mask.sum()
    sim /= max(num_tokens, 1)
    overlap = float(overlap_sum / overlap_pairs) if overlap_pairs > 0 else float("nan")
    return sim, overlap


def routed_output_rms(outputs: torch.Tensor, routing_map: torch.Tensor) -> float:
    """RMS of the routed outputs: sqrt(mean over selected (t, e) of ||x_te||^2 / H).

    Args:
        outputs: [T, E, H] unweighted outputs of every expert on T tokens.
        routing_map: [T, E] bool, the experts each token was routed to.

    Returns:
        The RMS (float), NaN if nothing is routed.
    """
    selected = outputs[routing_map].double()  # [pairs, H]
    if selected.numel() == 0:
        return float("nan")
    return float(selected.square().mean().sqrt())


def silhouette_score(points: torch.Tensor, labels: torch.Tensor, metric: str = "cosine") -> float:
    """Mean silhouette coefficient of ``points`` [N, D] grouped by integer ``labels`` [N].

    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other points of its cluster,
    b_i the smallest mean distance to the points of another cluster; s_i = 0 for a point alone
    in its cluster. Distances: ``cosine`` (1 - cos) or ``euclidean``. NaN unless
    2 <= number of clusters <= N - 1 (as sklearn). Cost O(N^2 D) time, O(N^2) memory.
    """
    x = points.double()
    n = x.shape[0]
    uniq, inv = torch.unique(labels, return_inverse=True)
    num_clusters = uniq.numel()
    if not 2 <= num_clusters <= n - 1:
        return float("nan")
    if metric == "cosine":
        xn = F.normalize(x, dim=-1, eps=1e-12)
        dist = (1.0 - xn @ xn.T).clamp_min(0.0)
    elif metric == "euclidean":
        sq = x.square().sum(-1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0).sqrt()
    else:
        raise ValueError(f"unknown silhouette metric {metric!r}; use 'cosine' or 'euclidean'")
    dist.fill_diagonal_(0.0)
    onehot = F.one_hot(inv, num_clusters).double()
    sums = dist @ onehot  # [N, C] summed distance to each cluster
    sizes = onehot.sum(0)
    own_size = sizes[inv]
    rows = torch.arange(n, device=x.device)
    a = sums[rows, inv] / (own_size - 1).clamp_min(1)
    other = sums / sizes
    other[rows, inv] = math.inf
    b = other.min(1).values
    denom = torch.maximum(a, b)
    s = torch.where(denom > 0, (b - a) / denom.clamp_min(_TINY), torch.zeros_like(a))
    s = torch.where(own_size > 1, s, torch.zeros_like(s))
    return float(s.mean())
