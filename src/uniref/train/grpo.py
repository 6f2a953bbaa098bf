"""GRPO math for MSGRPO: group advantages from several reward sources, and the clipped policy-ratio loss.

Pure functions over tensors; the training loop (:mod:`uniref.train.msgrpo`) wires them to the sampler.

**Rewards in.** One dict per sample, source name → reward (``ref_1`` .. ``ref_K`` per reference,
``instruction``, ``quality``, or any other name), or ``None`` when the reward call failed. ``group_ids`` says
which samples are the G outputs of one prompt. A sample takes part only if it has a finite reward for every
source its group uses (the union of the group's keys); otherwise it is *dropped*: excluded from every
statistic, advantage 0, ``valid = False`` (DESIGN §2: a failed call is never scored 0).

**Group normalisation** of one source s in group g over the valid samples:

    N_g(r)_i = (r_i − mean_g r) / (std_g r + eps)            (population std, as Flow-GRPO's np.std)

and N_g(r) = 0 for the whole group when std_g r < ``min_std``: a source that (nearly) does not vary in a
group carries no signal there, and dividing by a tiny spread would turn rounding noise into ±1 advantages.

**Aggregators** (``AGGREGATORS``; ``w`` = weights, ``w_ref`` shared by the K reference sources):

* ``raw_sum`` (Flow-GRPO):  A = N_g( w_ref·mean_k r_k + Σ_{s other} w_s·r_s ) — one loud source dominates.
* ``weighted_sum`` (MixGRPO / Pref-GRPO):  A = (w_ref/K)·Σ_k N_g(r_k) + Σ_{s other} w_s·N_g(r_s).
* ``reconcile`` (MSGRPO, ours):  A = w_ref·N_g(softmin_τ(r_1..r_K)) + Σ_{s other} w_s·N_g(r_s), with

      softmin_τ(r) = −τ·log( (1/K)·Σ_k exp(−r_k/τ) ),        min_k r_k ≤ softmin_τ(r) ≤ min_k r_k + τ·log K.

  Why: the per-reference rewards share one scale (one metric, one judge axis), so their soft minimum is taken
  on the *raw* rewards, then normalised as a source of its own. Its bounds make the guarantee: an output that
  drops any reference (r_k ≈ 0) scores at most τ·log K on this source, below every output whose worst
  reference exceeds that, whatever it does on the others — no reference can be traded away. Its gradient
  weights, softmax(−r/τ), go mostly to the weakest reference yet keep every reference in the signal (τ → ∞
  gives the mean, τ → 0 the hard minimum). Normalising each reference *before* the soft-min does not work: in
  a group of A = (1.0, 0.0) and B = (0.45, 0.45), each reference alone ranks A and B as ±1 and the soft-min
  of (+1, −1) ties with that of (−1, +1); the raw sum even prefers A (1.0 > 0.9); ``reconcile`` prefers B.

``renormalize=True`` (GDPO) re-normalises the combined advantage in its group: A ← N_g(A). Finally A is
clipped to ±``clip`` (Flow-GRPO: 5).

**Loss** (Flow-GRPO / PPO), per sample and step, ``ratio = exp(logp − logp_old)``:

    L = mean( max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)) ) + β·mean(KL),   KL = ‖μ_θ − μ_ref‖² / (2·s²)

with the KL averaged over the non-batch dims like the log-prob (s the step std of the SDE step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

REF_SOURCE = re.compile(r"ref_(\d+)")  # per-reference source names: ref_1 .. ref_K, in picture order
REF_WEIGHT = "ref"  # key of ``weights`` shared by all per-reference sources
# Added to the group std in the denominator (Flow-GRPO's 1e-4): keeps the division finite just above min_std.
ADV_EPS = 1e-4
# A source whose std within a group is below this contributes 0 there. Rewards are in [0, 1]; 1e-3 is a
# hundredth of the judge's resolution (0-10 integer scores → steps of 0.1) and far above float noise
# of the exact metrics, so only groups that really agree are silenced.
MIN_GROUP_STD = 1e-3
ADV_CLIP = 5.0  # |advantage| cap (Flow-GRPO)
# Soft-min temperature on [0, 1] rewards: the soft-min is within τ·log K of the worst reference (0.07 for K = 4).
SOFTMIN_TAU = 0.05
PPO_CLIP = 1e-4  # ratio clip ε (Flow-GRPO's value; per-step log-probs are averages over many dims, so tiny)

Rewards = Sequence[Mapping[str, float] | None]


def group_index(group_ids: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """(N,) int64 group index 0..G−1 in order of first appearance, from any hashable ids."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.int64)


def group_normalize(
    values: torch.Tensor,
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    eps: float = ADV_EPS,
    min_std: float = MIN_GROUP_STD,
) -> torch.Tensor:
    """(N,) ``(r − mean_g)/(std_g + eps)`` per group over the finite entries; NaN entries (absent) stay NaN and
    are left out of the statistics; a group with ``std_g < min_std`` (incl. a single valid sample) gives 0."""
    values = values.to(torch.float64)
    index = group_index(group_ids)
    out = torch.full_like(values, math.nan)
    for g in index.unique():
        members = (index == g) & torch.isfinite(values)
        if not members.any():
            continue
        r = values[members]
        std = r.std(unbiased=False)
        out[members] = 0.0 if std < min_std else (r - r.mean()) / (std + eps)
    return out


def softmin(values: torch.Tensor, tau: float = SOFTMIN_TAU) -> torch.Tensor:
    """(N,) ``−τ·log((1/K)·Σ_k exp(−r_k/τ))`` over the last axis of (N, K); between min and min + τ·log K.

    NaN entries are references a sample does not have (K differs between groups): they count as +inf,
    so exp(−inf/τ) = 0 adds nothing and K is the row's own count of finite entries.
    """
    k = torch.isfinite(values).sum(-1).clamp(min=1).to(values.dtype)
    return -tau * (torch.logsumexp(-torch.nan_to_num(values, nan=math.inf) / tau, dim=-1) - torch.log(k))


@dataclass
class RewardTable:
    """Rewards as columns: source name → (N,) float64, NaN where absent or the sample was dropped."""

    columns: dict[str, torch.Tensor]
    valid: torch.Tensor  # (N,) bool: the sample has every source its group uses
    group_ids: torch.Tensor  # (N,) int64 group index

    def ref_names(self) -> list[str]:
        """``ref_1`` .. ``ref_K`` present in the table (K may differ between groups), by reference index."""
        refs = [n for n in self.columns if REF_SOURCE.fullmatch(n)]
        return sorted(refs, key=lambda n: int(REF_SOURCE.fullmatch(n).group(1)))  # type: ignore[union-attr]

    def other_names(self) -> list[str]:
        return [n for n in self.columns if not REF_SOURCE.fullmatch(n)]


def reward_table(rewards: Rewards, group_ids: Sequence[Hashable] | torch.Tensor) -> RewardTable:
    """Collect per-sample reward dicts into columns and decide which samples take part (see module doc)."""
    index = group_index(group_ids)
    if len(index) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(index)} group ids")
    names = list(dict.fromkeys(name for r in rewards if r is not None for name in r))
    columns = {
        n: torch.tensor([math.nan if r is None else float(r.get(n, math.nan)) for r in rewards], dtype=torch.float64)
        for n in names
    }
    valid = torch.tensor([r is not None for r in rewards], dtype=torch.bool)
    for col in columns.values():
        # The groups that use this source: those where some sample has it. Their samples without it are dropped.
        uses = torch.zeros_like(valid)
        for g in index[torch.isfinite(col)].unique():
            uses |= index == g
        valid &= ~uses | torch.isfinite(col)
    for col in columns.values():
        col[~valid] = math.nan
    return RewardTable(columns=columns, valid=valid, group_ids=index)


def _weight(weights: Mapping[str, float], name: str) -> float:
    return weights.get(name, 1.0)


def _nan_as_zero(t: torch.Tensor) -> torch.Tensor:
    """A source absent in a group (NaN there for every sample) adds nothing to that group's advantage."""
    return torch.nan_to_num(t, nan=0.0)


def _ref_matrix(table: RewardTable) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-reference columns and (N,) K per sample (how many references each valid sample has)."""
    refs = [table.columns[n] for n in table.ref_names()]
    k = sum((torch.isfinite(c).to(torch.float64) for c in refs), torch.zeros(len(table.valid), dtype=torch.float64))
    return refs, k


class Aggregator(Protocol):
    def __call__(
        self, table: RewardTable, weights: Mapping[str, float], *, tau: float, eps: float, min_std: float
    ) -> torch.Tensor: ...


def raw_sum(
    table: RewardTable, weights: Mapping[str, float], *, tau: float, eps: float, min_std: float
) -> torch.Tensor:
    """Flow-GRPO: ``N_g(w_ref·mean_k r_k + Σ_s w_s·r_s)`` — sum the raw rewards, then normalise."""
    del tau  # unused: same signature for every aggregator
    refs, k = _ref_matrix(table)
    total = torch.zeros(len(table.valid), dtype=torch.float64)
    if refs:
        total += _weight(weights, REF_WEIGHT) * sum(_nan_as_zero(c) for c in refs) / k.clamp(min=1)
    for n in table.other_names():
        total += _weight(weights, n) * _nan_as_zero(table.columns[n])
    total[~table.valid] = math.nan
    return group_normalize(total, table.group_ids, eps=eps, min_std=min_std)


def weighted_sum(
    table: RewardTable, weights: Mapping[str, float], *, tau: float, eps: float, min_std: float
) -> torch.Tensor:
    """MixGRPO / Pref-GRPO: ``(w_ref/K)·Σ_k N_g(r_k) + Σ_s w_s·N_g(r_s)`` — normalise each source, then weigh."""
    del tau
    norm = {
        n: _nan_as_zero(group_normalize(c, table.group_ids, eps=eps, min_std=min_std)) for n, c in table.columns.items()
    }
    refs, k = _ref_matrix(table)
    out = torch.zeros(len(table.valid), dtype=torch.float64)
    if refs:
        out += _weight(weights, REF_WEIGHT) * sum(norm[n] for n in table.ref_names()) / k.clamp(min=1)
    for n in table.other_names():
        out += _weight(weights, n) * norm[n]
    return out


def reconcile(
    table: RewardTable, weights: Mapping[str, float], *, tau: float, eps: float, min_std: float
) -> torch.Tensor:
    """MSGRPO: ``w_ref·N_g(softmin_τ(r_1..r_K)) + Σ_s w_s·N_g(r_s)`` — the soft-min of the raw per-reference
    rewards is one source (see the module doc for why it is taken before normalising)."""
    out = torch.zeros(len(table.valid), dtype=torch.float64)
    refs = table.ref_names()
    if refs:
        matrix = torch.stack([table.columns[n] for n in refs], dim=-1)  # (N, K_max), NaN past a sample's K
        soft = softmin(matrix, tau)
        # Dropped samples, and samples of groups without references (soft-min of nothing = +inf), are absent.
        soft = soft.masked_fill(~table.valid | ~torch.isfinite(soft), math.nan)
        out += _weight(weights, REF_WEIGHT) * _nan_as_zero(
            group_normalize(soft, table.group_ids, eps=eps, min_std=min_std)
        )
    for n in table.other_names():
        out += _weight(weights, n) * _nan_as_zero(
            group_normalize(table.columns[n], table.group_ids, eps=eps, min_std=min_std)
        )
    return out


def ref_conflict_fraction(table: RewardTable, margin: float = 0.05) -> float:
    """Share of within-group pairs of valid samples that their references rank in opposite directions: some
    reference prefers one sample by more than ``margin`` and another reference prefers the other.

    Only such pairs let a summed reward trade one reference for another, so this is the share of the signal
    where ``reconcile`` can differ from ``raw_sum`` at all; 0 when no group has two references.
    """
    refs = table.ref_names()
    if len(refs) < 2:
        return 0.0
    matrix = torch.stack([table.columns[n] for n in refs], dim=-1)  # (N, K_max), NaN where absent
    pairs = conflicts = 0
    for g in table.group_ids.unique():
        r = matrix[(table.group_ids == g) & table.valid]
        if len(r) < 2:
            continue
        diff = r[:, None, :] - r[None, :, :]  # NaN comparisons are False: absent references never vote
        conflict = (diff > margin).any(-1) & (diff < -margin).any(-1)
        upper = torch.triu(torch.ones_like(conflict), diagonal=1)
        pairs += int(upper.sum())
        conflicts += int((conflict & upper).sum())
    return conflicts / pairs if pairs else 0.0


def advantage_agreement(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float | None:
    """Cosine similarity of two aggregators' advantages for the same rollouts (valid samples only): near 1
    they push the policy the same way and the choice of aggregator changes little. None when either has no
    signal (all zero)."""
    x, y = a[valid].double(), b[valid].double()
    norms = float(x.norm() * y.norm())
    return float(x @ y) / norms if norms > 0 else None


AGGREGATORS: dict[str, Aggregator] = {"raw_sum": raw_sum, "weighted_sum": weighted_sum, "reconcile": reconcile}


@dataclass
class Advantages:
    advantages: torch.Tensor  # (N,) float32, clipped to ±clip; 0 for dropped samples
    valid: torch.Tensor  # (N,) bool: False for samples dropped for a failed/missing reward (leave out of the loss)
    table: RewardTable  # the rewards as columns, for logging (reward by source, worst reference)
    dropped: int = field(init=False)  # number of dropped samples

    def __post_init__(self) -> None:
        self.dropped = int((~self.valid).sum())


def compute_advantages(
    rewards: Rewards,
    group_ids: Sequence[Hashable] | torch.Tensor,
    aggregator: str = "reconcile",
    *,
    weights: Mapping[str, float] | None = None,
    tau: float = SOFTMIN_TAU,
    renormalize: bool = False,
    clip: float = ADV_CLIP,
    eps: float = ADV_EPS,
    min_std: float = MIN_GROUP_STD,
) -> Advantages:
    """One advantage per sample from per-source rewards (formulas in the module doc).

    ``rewards[i]``: source → reward for sample i, or None if its reward call failed. ``group_ids[i]``: the
    prompt it was sampled for. ``aggregator``: a key of ``AGGREGATORS``. ``weights``: per source name, ``"ref"``
    for the per-reference sources together; missing names weigh 1. ``renormalize``: GDPO's re-normalisation
    of the combined advantage within its group.
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {aggregator!r}: choose one of {sorted(AGGREGATORS)}")
    table = reward_table(rewards, group_ids)
    adv = AGGREGATORS[aggregator](table, weights or {}, tau=tau, eps=eps, min_std=min_std)
    if renormalize:
        adv = adv.masked_fill(~table.valid, math.nan)
        adv = _nan_as_zero(group_normalize(adv, table.group_ids, eps=eps, min_std=min_std))
    adv = adv.masked_fill(~table.valid, 0.0).clamp(-clip, clip)
    return Advantages(advantages=adv.to(torch.float32), valid=table.valid, table=table)


# --- the clipped policy-ratio loss --------------------------------------------------------------------------------


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """(B,) KL between the step Gaussians of the policy and the reference (same std): ``‖μ_θ − μ_ref‖²/(2·s²)``,
    averaged over the non-batch dims like :func:`uniref.flow.sde_log_prob`. The reference is usually the same
    model with its LoRA adapter disabled. Computed in float32 or wider."""
    work = torch.promote_types(mean.dtype, torch.float32)
    std = torch.as_tensor(std, dtype=work, device=mean.device)
    kl = (mean.to(work) - mean_ref.to(work)) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean.dim())))


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # () the objective to minimise: policy term + kl_coef·KL
    policy_loss: torch.Tensor  # () the clipped policy term alone
    clip_fraction: torch.Tensor  # () detached: share of samples with |ratio − 1| > ε
    ratio_mean: torch.Tensor  # () detached mean ratio (exactly 1 on the first update of a rollout)
    kl: torch.Tensor | None  # () detached mean KL, if given


def _masked_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t.mean()
    return (t * mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = PPO_CLIP,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyLoss:
    """PPO-clip on per-step log-probs (Flow-GRPO), all (B,):

        ratio = exp(logp − logp_old);   L = mean( max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)) ) + β·mean(KL)

    ``old_log_prob`` is detached (the rollout's). ``mask`` (B,) bool/float leaves dropped samples out of every
    mean. ``kl``: per-sample :func:`kl_to_reference`, weighted by ``kl_coef`` (β; 0 in the paper).
    Where ratio = 1 the loss gradient is the plain policy gradient of ``−mean(A·logp)``.
    """
    work = torch.promote_types(log_prob.dtype, torch.float32)
    m = None if mask is None else mask.to(work)
    adv = advantages.to(work)
    ratio = torch.exp(log_prob.to(work) - old_log_prob.detach().to(work))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = _masked_mean(torch.maximum(unclipped, clipped), m)
    loss = policy
    kl_mean = None
    if kl is not None:
        kl_mean = _masked_mean(kl.to(work), m)
        loss = loss + kl_coef * kl_mean
        kl_mean = kl_mean.detach()
    with torch.no_grad():
        clip_fraction = _masked_mean(((ratio - 1.0).abs() > clip_range).to(work), m)
        ratio_mean = _masked_mean(ratio, m)
    return PolicyLoss(
        loss=loss, policy_loss=policy.detach(), clip_fraction=clip_fraction, ratio_mean=ratio_mean, kl=kl_mean
    )
