"""The losses of task-level distillation: E_M learns E_T's answers on the task's own prompts.

For each prompt x (prompts.py: the zero-shot `letter` prompt, cut to the window), with K options
whose continuation tokens are c_1..c_K, `prompt_loss` is

    L(x) = alpha * KL( p_T(. | x) || p_M(. | x) )                         answer distribution
         + gamma * (1/n) sum_t KL( p_T^k(. | x_<=t) || p_M^k(. | x_<=t) ) prompt tokens
         + delta * (1/|R|) sum_{p in R} e_p(x)                             layer-wise alignment

  p_M(k | x)  = softmax_k( z_M(x)[c_k] ): the student's next-token logits z_M at the prompt's last
                position, renormalised over the K option tokens (what option scoring reads;
                `student_option_logits`)
  p_T(k | x)  = the teacher's answer: softmax_k of its option head's logits when a head is given
                (`medmoe heads train`: its calibrated distribution), else of E_T's own z_T(x)[c_k]
  p^k(. | x_<=t) the next-token distribution at prompt position t (t = 1..n, the prompt's n tokens)
                coarsened to k + 1 bins: the teacher's k most likely tokens there and "the rest"
                (KL of the binned distributions, a lower bound of the full-vocabulary KL that the
                general distillation uses: full teacher logits, n x 49,152 values per prompt, are too
                big to cache; k = `top_k`, 64)
  R           the student layers whose attention was replaced, p <- teacher layer j (HybridSpec)
  e_p(x)      || Mixer_p(u_j) - a_j ||^2 / || a_j ||^2, the student mixer fed the teacher's own input
                u_j of layer j's attention (after its input norm) against that attention's output
                a_j (mamba/align.py; MOHAWK's hidden-state alignment). A mean over R, so delta does
                not depend on how many layers were replaced.

The alpha term is `answer_kl`, the gamma term `topk_token_kl`, the delta term mamba/align.py's
`alignment_error`. The answer loss never reads a label, only the teacher's distribution (read from
the teacher cache, teacher_cache.py); labels score the held-out evaluation only.
"""

from __future__ import annotations

from typing import Any

import torch

from medmoe.eval.scoring import accepts_logits_to_keep
from medmoe.mamba.align import alignment_error
from medmoe.mamba.hybrid import HybridSpec
from medmoe.train.task_distill.config import TaskDistillConfig


def answer_kl(teacher_logp: torch.Tensor, student_option_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_M) over the K options: teacher_logp (K,) log p_T, student_option_logits (K,) z_M[c_k]."""
    log_q = torch.log_softmax(student_option_logits.float(), dim=-1)
    p = teacher_logp.float().exp()
    return (p * (teacher_logp.float() - log_q)).sum()


def topk_token_kl(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL between the (k + 1)-bin distributions: the teacher's top-k tokens at
    that position and the rest. student_logits (n, V); topk_idx, topk_logp (n, k)."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_qk = log_q.gather(-1, topk_idx.long())                                   # (n, k)
    log_p = topk_logp.float()
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)                              # (n,)
    q_rest = (-torch.expm1(torch.logsumexp(log_qk, dim=-1))).clamp_min(1e-12)    # 1 - sum_k q_k
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return ((log_p.exp() * (log_p - log_qk)).sum(-1) + rest).mean()


def student_option_logits(model: Any, ids: torch.Tensor, options: torch.Tensor, all_positions: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_M[c_k] at the last position (K,), the logits (n or 1, V)) of one prompt."""
    keep = {} if all_positions or not accepts_logits_to_keep(model) else {"logits_to_keep": 1}
    device = next(model.parameters()).device
    logits = model(input_ids=ids.long().to(device)[None], use_cache=False, **keep).logits[0]
    return logits[-1, options.long().to(device)], logits


def prompt_loss(student: Any, spec: HybridSpec, entry: dict[str, torch.Tensor], cfg: TaskDistillConfig,
                align_only: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """L(x) of one prompt (module docstring) and its terms."""
    terms: dict[str, float] = {}
    total = torch.zeros(())
    if not align_only and (cfg.alpha or cfg.gamma):
        option_logits, logits = student_option_logits(student, entry["ids"], entry["options"], all_positions=cfg.gamma > 0)
        if cfg.alpha:
            kl = answer_kl(entry["logp"], option_logits)
            total = total + cfg.alpha * kl
            terms["answer_kl"] = kl.item()
        if cfg.gamma:
            tok = topk_token_kl(logits, entry["topk_idx"], entry["topk_logp"])
            total = total + cfg.gamma * tok
            terms["token_kl"] = tok.item()
    mixers = spec.mixer_layers()
    if cfg.aligns and mixers:
        errors = [alignment_error(student, p, entry[f"in.{j}"], entry[f"out.{j}"]) for p, j in mixers]
        align = torch.stack(errors).mean()
        total = total + cfg.delta * align
        terms["align"] = align.item()
    return total, terms
