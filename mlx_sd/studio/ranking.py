"""Rankings from pairwise votes: Bradley-Terry scores with bootstrap intervals, win fractions, counts.

Follows GenAI-Arena, which uses FastChat's Chatbot Arena analysis (`compute_mle_elo`,
`get_bootstrap_result`, `compute_pairwise_win_fraction` in fastchat/serve/monitor/elo_analysis.py):
- Bradley-Terry fitted by logistic regression without intercept, P(i beats j) = sigmoid(t_i - t_j),
  weighted as `compute_mle_elo` weighs its table of wins: a decisive vote counts as two wins for its
  winner, a tie as one win for each side, and "both bad" is a tie (FastChat's "tie (bothbad)").
- Reported on the Elo scale FastChat uses: 1000 + 400 * t / ln(10).
- 95% intervals: the 2.5 and 97.5 percentiles of fits on battles resampled with replacement.
- Win fraction of i over j: i's wins over j divided by the decisive (non-tie) battles between them.

FastChat fits with scikit-learn; here the same likelihood is maximised by Newton's method with numpy.
A weak ridge (RIDGE, a N(0, 100^2) prior on t in natural-log units) keeps the fit finite when one source
wins every battle (sklearn without a penalty stops at a large finite value there too) and fixes the free
offset (scores sum to zero before the 1000 is added).
"""

from __future__ import annotations

import math

import numpy as np

RIDGE = 1e-4
ELO_SCALE = 400 / math.log(10)
ELO_INIT = 1000.0


def win_matrix(n: int, a: np.ndarray, b: np.ndarray, outcome: np.ndarray,
               weight: np.ndarray | None = None) -> np.ndarray:
    """W[i, j] = weighted wins of i over j: 2 per vote i won, 1 per tie between them (in both W[i, j] and W[j, i]).

    outcome per battle: 0 = a won, 1 = b won, 2 = tie (or both bad).
    """
    w = np.ones(len(a)) if weight is None else np.asarray(weight, dtype=np.float64)
    w = w * np.where(outcome == 2, 1.0, 2.0)
    W = np.zeros((n, n))
    np.add.at(W, (a[outcome != 1], b[outcome != 1]), w[outcome != 1])
    np.add.at(W, (b[outcome != 0], a[outcome != 0]), w[outcome != 0])
    return W


def fit_bradley_terry(W: np.ndarray, ridge: float = RIDGE, tol: float = 1e-9, max_iter: int = 100,
                      start: np.ndarray | None = None) -> np.ndarray:
    """Strengths t (natural-log odds scale, summing to zero) maximising sum W[i,j] log sigmoid(t_i - t_j)."""
    n = W.shape[0]
    N = W + W.T
    t = np.zeros(n) if start is None else np.array(start, dtype=np.float64)

    def loss(t):
        return float(np.sum(W * np.logaddexp(0.0, t[None, :] - t[:, None])) + 0.5 * ridge * t @ t)

    cur = loss(t)
    for _ in range(max_iter):
        P = 1.0 / (1.0 + np.exp(t[None, :] - t[:, None]))
        grad = (N * P - W).sum(axis=1) + ridge * t
        C = N * P * (1.0 - P)
        step = np.linalg.solve(np.diag(C.sum(axis=1) + ridge) - C, grad)
        # Damped Newton: halve the step while it raises the loss (it overshoots when one side wins
        # nearly everything); the slack absorbs rounding once the optimum is reached.
        s = 1.0
        for _ in range(30):
            new = loss(t - s * step)
            if new <= cur + 1e-12 * abs(cur):
                break
            s *= 0.5
        t, cur = t - s * step, min(cur, new)
        if np.max(np.abs(s * step)) < tol:
            break
    return t - t.mean()


def elo(t: np.ndarray) -> np.ndarray:
    return ELO_INIT + ELO_SCALE * t


def bootstrap(n: int, a: np.ndarray, b: np.ndarray, outcome: np.ndarray, rounds: int = 1000,
              seed: int = 0) -> np.ndarray:
    """Elo-scale scores of `rounds` fits, each on the battles resampled with replacement: (rounds, n)."""
    rng = np.random.default_rng(seed)
    m = len(a)
    # Resampling battles with replacement = a multinomial draw over the distinct (a, b, outcome) kinds,
    # which keeps each round O(n^2) however many votes there are.
    kinds, counts = np.unique((a * n + b) * 3 + outcome, return_counts=True)
    ka, kb, ko = kinds // 3 // n, kinds // 3 % n, kinds % 3
    start = fit_bradley_terry(win_matrix(n, a, b, outcome))
    out = np.empty((rounds, n))
    for r in range(rounds):
        w = rng.multinomial(m, counts / m)
        out[r] = elo(fit_bradley_terry(win_matrix(n, ka, kb, ko, w), start=start))
    return out


def summarize(votes: list[dict], rounds: int = 1000, seed: int = 0) -> dict:
    """Everything the results table shows, from vote rows (source_a, source_b, answer)."""
    names = sorted({v["source_a"] for v in votes} | {v["source_b"] for v in votes})
    idx = {s: k for k, s in enumerate(names)}
    n = len(names)
    a = np.array([idx[v["source_a"]] for v in votes], dtype=np.int64)
    b = np.array([idx[v["source_b"]] for v in votes], dtype=np.int64)
    outcome = np.array([{"A": 0, "B": 1}.get(v["answer"], 2) for v in votes], dtype=np.int64)

    pairs: dict[tuple[str, str], dict] = {}
    for v in votes:
        key = (v["source_a"], v["source_b"])
        row = pairs.setdefault(key, {"a": key[0], "b": key[1], "a_wins": 0, "b_wins": 0, "ties": 0, "both_bad": 0})
        row[{"A": "a_wins", "B": "b_wins", "tie": "ties", "both_bad": "both_bad"}[v["answer"]]] += 1

    decisive = np.zeros((n, n))
    np.add.at(decisive, (a[outcome == 0], b[outcome == 0]), 1)
    np.add.at(decisive, (b[outcome == 1], a[outcome == 1]), 1)
    battles = np.zeros((n, n), dtype=np.int64)
    np.add.at(battles, (a, b), 1)
    battles = battles + battles.T
    total = decisive + decisive.T
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, decisive / np.where(total > 0, total, 1), np.nan)

    ratings = []
    if n >= 2:
        point = elo(fit_bradley_terry(win_matrix(n, a, b, outcome)))
        boots = bootstrap(n, a, b, outcome, rounds, seed) if rounds else np.tile(point, (1, 1))
        lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        ratings = [{"name": names[k], "score": float(point[k]), "lo": float(lo[k]), "hi": float(hi[k]),
                    "battles": int(battles[k].sum())} for k in range(n)]
        ratings.sort(key=lambda r: -r["score"])
    return {
        "votes": len(votes),
        "ratings": ratings,
        "pairs": sorted(pairs.values(), key=lambda r: (r["a"], r["b"])),
        "matrix": {"names": names, "win_fraction": [[None if math.isnan(x) else float(x) for x in row] for row in frac],
                   "battles": battles.tolist()},
        "bootstrap_rounds": rounds,
    }
