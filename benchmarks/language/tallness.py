"""Why TALL masks rebuild language-model fine-tunes poorly, measured from the weights alone.

A task's TALL rebuild is base + m_t * mtv with m_t = |tau_t| > lambda |mtv - tau_t| (tau_t = theta_t - theta_0,
mtv = the sum of all tau). Writing o_t = mtv - tau_t (the other tasks' sum), the rebuild's error is
    rebuilt - theta_t = m_t * o_t  -  (1 - m_t) * tau_t
            = interference (the others' vectors where the mask keeps a weight)  -  dropped (own vector elsewhere).
TALL assumes task supports barely overlap, so both terms are small. Dense AdamW updates that all tasks make on
every weight break that: |o_t| is as large as |tau_t| almost everywhere. Everything here is plain torch on the
flattened float tensors (no tallzip code), so it also checks tallzip's rebuild independently.
"""
from __future__ import annotations

import itertools

import torch


def flat(state: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).float() for n in names])


def fidelity(base: torch.Tensor, task: torch.Tensor, rebuilt: torch.Tensor) -> dict:
    """Data-free statistics of a rebuild against its fine-tune (flattened float32 vectors):
    rel_l2 = ||rebuilt - theta_t|| / ||tau_t||; energy_kept = 1 - rel_l2^2 (share of tau_t's energy the rebuild
    gets right; negative when the rebuild is further from theta_t than the base is); cosine between the rebuilt
    task vector and tau_t."""
    tau = task - base
    rec = rebuilt - base
    norm = tau.norm()
    rel = float((rebuilt - task).norm() / norm) if norm > 0 else 0.0
    cos = float(torch.nn.functional.cosine_similarity(rec, tau, dim=0)) if rec.norm() > 0 and norm > 0 else 0.0
    return {"rel_l2": rel, "energy_kept": 1.0 - rel * rel, "cosine": cos}


def tall_diagnosis(base: torch.Tensor, tasks: dict[str, torch.Tensor], lambdas: dict[str, float]) -> dict:
    """Per task: mask density, share of weights the fine-tune changed at all, the energy share of its top 20%
    entries (a concentrated update puts most of its energy there), |o_t| against |tau_t|, and the rebuild's error
    split into interference and dropped; pairwise: cosine of task vectors and the overlap (Jaccard) of their
    top-20% supports."""
    taus = {t: v - base for t, v in tasks.items()}
    mtv = sum(taus.values())
    out, tops = {"tasks": {}}, {}
    for t, tau in taus.items():
        others = mtv - tau
        mask = tau.abs() > lambdas[t] * others.abs()
        energy = float(tau.pow(2).sum())
        k = max(1, int(0.2 * tau.numel()))
        top = tau.abs().topk(k).indices
        tops[t] = torch.zeros_like(tau, dtype=torch.bool).index_fill_(0, top, True)
        interference = float((mask * others).pow(2).sum()) / energy
        dropped = float((~mask * tau).pow(2).sum()) / energy
        out["tasks"][t] = {
            "lambda": lambdas[t],
            "mask_density": float(mask.float().mean()),
            "changed_share": float((tau != 0).float().mean()),
            "top20_energy_share": float(tau[top].pow(2).sum()) / energy,
            "others_over_own_median": float((others.abs() / tau.abs().clamp_min(1e-12))[tau != 0].median()),
            "interference_energy": interference,
            "dropped_energy": dropped,
            "rel_l2": (interference + dropped) ** 0.5,  # the two terms live on disjoint weights
        }
    pairs = {}
    for a, b in itertools.combinations(taus, 2):
        inter = float((tops[a] & tops[b]).sum())
        union = float((tops[a] | tops[b]).sum())
        pairs[f"{a}|{b}"] = {"cosine": float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0)),
                             "top20_jaccard": inter / union}
    out["pairs"] = pairs
    n = len(pairs) or 1
    out["mean_pair_cosine"] = sum(p["cosine"] for p in pairs.values()) / n
    out["mean_pair_top20_jaccard"] = sum(p["top20_jaccard"] for p in pairs.values()) / n
    out["random_top20_jaccard"] = 0.2 / (2 - 0.2)  # two independent random 20% supports
    return out
