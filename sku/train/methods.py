"""Unlearning methods as data: per-token loss weights over kinds of rows, and whether stage 2
negates the result (DESIGN.md, "The math").

Kinds of rows, all built per step from the training pools (sku.data):
  forget    a harmful prompt with its own harmful response
  mismatch  the same prompt with k other responses (harmful for SKU, normal for GA+Mismatch)
  normal    a normal question with its answer; the KL term's reference is the original model
  safe      a PKU prompt with a response labelled safe (the FT baseline)

A term's weight is sign·ε[eps_index] (or sign·1 without ε); `token_weight` spreads it over
the answer tokens of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

ROW_KINDS = ("forget", "mismatch", "normal", "safe")


@dataclass(frozen=True)
class Term:
    rows: str  # one of ROW_KINDS
    loss: str  # "ce" (cross-entropy on the response) or "kl" (KL(original ‖ current))
    sign: int
    eps_index: int | None = None  # which ε weighs the term; None means weight 1

    @property
    def name(self) -> str:
        return f"{self.rows}_{self.loss}"

    def weight(self, eps: tuple[float, float, float]) -> float:
        return self.sign * (1.0 if self.eps_index is None else eps[self.eps_index])


@dataclass(frozen=True)
class Method:
    name: str
    terms: tuple[Term, ...]
    negate: bool  # stage 2: θ_u = θ_o − λ·(θ_stage1 − θ_o)
    mismatch_pool: str | None = None  # where mismatch responses come from: "forget" or "normal"

    def active_terms(self, eps: tuple[float, float, float]) -> list[tuple[Term, float]]:
        """(term, weight) for each term with a non-zero weight: ablations cost nothing."""
        return [(t, w) for t in self.terms if (w := t.weight(eps)) != 0.0]


def token_weight(term_weight: float, *, batch_size: int, rows: int, answer_tokens: int
                 ) -> float:
    """The loss weight of one answer token of a row: each term is the mean over the effective
    batch's examples, of the mean over the example's `rows` rows of the term (k mismatch rows
    per prompt, paper eq. 3; else 1), of the mean over the row's answer tokens, as in the
    official code. Counted over the whole effective batch, the summed loss does not depend on
    how the batch is split over processes and accumulation steps (DDP's mean over processes
    is undone in the training loop)."""
    return term_weight / (batch_size * rows * max(answer_tokens, 1))


METHODS = {m.name: m for m in (
    Method("ft", (Term("safe", "ce", +1),), negate=False),
    Method("ga", (Term("forget", "ce", -1),), negate=False),
    Method("ga_mismatch", (Term("forget", "ce", -1, 0), Term("mismatch", "ce", +1, 1),
                           Term("normal", "kl", +1, 2)), negate=False, mismatch_pool="normal"),
    Method("task_vector", (Term("forget", "ce", +1),), negate=True),
    # Guided distortion, random disassociation, preservation divergence (paper eq. 6): the
    # negative KL weight makes stage 1 raise the divergence that negation then reverses.
    Method("sku", (Term("forget", "ce", +1, 0), Term("mismatch", "ce", +1, 1),
                   Term("normal", "kl", -1, 2)), negate=True, mismatch_pool="forget"),
)}
