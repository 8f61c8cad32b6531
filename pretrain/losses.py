"""The recipe's objective on top of the `kernels` package, with the vocabulary projection on used rows only.

    loss = alpha_ce * KL(softmax(t/T) || softmax(s/T)) * T^2   (batchmean over the KL rows)
         + alpha_mlm * CE(student, labels)                     (mean over masked tokens)
         + alpha_cos * (1 - cos(h_s, h_t))                     (mean over non-pad tokens, last hidden states)
         + alpha_mse * sum((s - t)^2) / rows                   (optional, on the KL rows)

The KL rows are every non-pad token (the original) or, with `restrict_ce_to_mask`, the masked tokens. The
projection to the vocabulary (the expensive part: rows x hidden x vocab) is computed only for the rows a loss
uses and never for padding; the fused kernel does it in row chunks without holding [rows, vocab] logits.
Note the naming: the recipe's `alpha_ce` weighs the KL term and `alpha_mlm` the cross-entropy; the kernels
API calls them alpha_kl and alpha_ce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distil import kernels
from distil.pretrain.config import LossConfig
from distil.pretrain.families import family_of

IGNORE = -100


@dataclass
class TeacherOutput:
    """What the student's objective needs from the teacher, already restricted to the rows it uses."""

    head_input: torch.Tensor | None  # [rows, H]: transformed hidden states at the projection rows
    last_hidden: torch.Tensor | None  # [non-pad tokens, H]: for the cosine loss


@dataclass
class LossOutput:
    loss: torch.Tensor  # differentiable total
    parts: dict[str, torch.Tensor]  # detached components (unweighted), for logging; never synced here


def uses_kl(cfg: LossConfig) -> bool:
    return cfg.alpha_ce > 0 or cfg.alpha_mse > 0


def projection_rows(attention_mask: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, mode: str) -> torch.Tensor:
    """Bool [B, L]: the tokens whose vocabulary logits some loss needs."""
    masked = labels != IGNORE
    if mode == "distill" and uses_kl(cfg) and not cfg.restrict_ce_to_mask:
        return attention_mask.bool()
    return masked


@torch.inference_mode()
def _teacher_forward(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     rows: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    family = family_of(teacher)
    hidden = family.body(teacher)(input_ids=input_ids, attention_mask=attention_mask)[0]
    head_input = family.head_input(teacher, hidden[rows]) if uses_kl(cfg) else None
    last = hidden[attention_mask.bool()] if cfg.alpha_cos > 0 else None
    return head_input, last


def teacher_outputs(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, cfg: LossConfig) -> TeacherOutput:
    """Teacher forward under inference mode; results cloned so autograd may save them in the student's graph."""
    rows = projection_rows(attention_mask, labels, cfg, "distill")
    head_input, last = _teacher_forward(teacher, input_ids, attention_mask, rows, cfg)
    return TeacherOutput(
        head_input=head_input.clone() if head_input is not None else None,
        last_hidden=last.clone() if last is not None else None,
    )


class DistillationObjective(nn.Module):
    """Wraps the student so the DeepSpeed engine owns exactly its parameters; forward returns the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: LossConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.family = family_of(student)
        # The teacher's projection weights are read at each step but must not become engine parameters.
        self._teacher = [teacher]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher_out: TeacherOutput) -> LossOutput:
        cfg, student = self.cfg, self.student
        nonpad = attention_mask.bool()
        rows = projection_rows(attention_mask, labels, cfg, "distill")
        hidden = self.family.body(student)(input_ids=input_ids, attention_mask=attention_mask)[0]
        head_in = self.family.head_input(student, hidden[rows])
        row_labels = labels[rows]
        kl_mask = torch.ones_like(row_labels, dtype=torch.bool)
        s_weight, s_bias = self.family.decoder(student)
        teacher = self._teacher[0]
        t_weight, t_bias = family_of(teacher).decoder(teacher)
        alpha_kl = cfg.alpha_ce if teacher_out.head_input is not None else 0.0
        if cfg.alpha_mse > 0:
            # MSE needs the logits themselves: project explicitly (still only on the used rows).
            s_logits = nn.functional.linear(head_in, s_weight, s_bias)
            t_logits = nn.functional.linear(teacher_out.head_input, t_weight, t_bias).to(s_logits.dtype)
            dl = kernels.distillation_kl_ce(s_logits, t_logits, row_labels, kl_mask, cfg.temperature,
                                            alpha_kl, cfg.alpha_mlm)
            mse = (s_logits.float() - t_logits.float()).pow(2).sum() / max(1, s_logits.shape[0])
            total = dl.loss + cfg.alpha_mse * mse
            parts = {"loss_mse": mse.detach()}
        else:
            dl = kernels.fused_linear_distillation_kl_ce(
                head_in, s_weight, s_bias, None, row_labels, kl_mask, cfg.temperature, alpha_kl,
                cfg.alpha_mlm, teacher_hidden=teacher_out.head_input,
                teacher_weight=t_weight if teacher_out.head_input is not None else None,
                teacher_bias=t_bias if teacher_out.head_input is not None else None,
                chunk_size=cfg.chunk_size,
            )
            total = dl.loss
            parts = {}
        if teacher_out.head_input is not None:
            parts["loss_kl"] = dl.kl
        parts["loss_mlm"] = dl.ce
        if cfg.alpha_cos > 0:
            assert teacher_out.last_hidden is not None
            s_last = hidden[nonpad]
            cos = kernels.cosine_embedding_loss(s_last, teacher_out.last_hidden.to(s_last.dtype))
            total = total + cfg.alpha_cos * cos
            parts["loss_cos"] = cos.detach()
        parts["loss"] = total.detach()
        return LossOutput(total, parts)


class MaskedLMObjective(nn.Module):
    """MLM mode: a masked LM trained alone on cross-entropy over masked tokens (a teacher pretrained from scratch)."""

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.family = family_of(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher_out: TeacherOutput | None = None) -> LossOutput:
        rows = labels != IGNORE
        hidden = self.family.body(self.model)(input_ids=input_ids, attention_mask=attention_mask)[0]
        head_in = self.family.head_input(self.model, hidden[rows])
        weight, bias = self.family.decoder(self.model)
        row_labels = labels[rows]
        kl_mask = torch.zeros_like(row_labels, dtype=torch.bool)
        dl = kernels.fused_linear_distillation_kl_ce(head_in, weight, bias, None, row_labels,
                                                     kl_mask, 1.0, 0.0, 1.0, chunk_size=self.cfg.chunk_size)
        parts = {"loss_mlm": dl.ce, "loss": dl.loss.detach()}
        return LossOutput(dl.loss, parts)
