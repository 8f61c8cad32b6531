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

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from distil import kernels
from distil.common.errors import UserError
from distil.pretrain import layer_losses
from distil.pretrain.config import LossConfig
from distil.pretrain.families import family_of
from distil.pretrain.layer_losses import LayerPlan

IGNORE = -100


@dataclass
class TeacherOutput:
    """What the student's objective needs from the teacher, already restricted to the rows it uses."""

    head_input: torch.Tensor | None  # [rows, H]: transformed hidden states at the projection rows
    last_hidden: torch.Tensor | None  # [non-pad tokens, H]: for the cosine loss
    hidden: list[torch.Tensor] | None = None  # per LayerPlan.hidden_pairs: [non-pad tokens, H]
    qkv: list[torch.Tensor] | None = None  # the relation layer's query, key, value: [B, L, H] each
    attentions: list[torch.Tensor] | None = None  # per LayerPlan.attention_pairs: [B, heads, L, L]


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


def encoder_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    plan: LayerPlan | None, qkv_layer: int | None):
    """The encoder's outputs with what the plan's layer losses need (hidden states, attention probabilities,
    the query/key/value of layer `qkv_layer`, 0-based), as (output, [q, k, v])."""
    family = family_of(model)
    extra = {}
    if plan is not None and plan.hidden_states:
        extra["output_hidden_states"] = True
    if plan is not None and plan.attentions:
        extra["output_attentions"] = True
    capture = (layer_losses.capture_qkv(family.qkv(family.layers(model)[qkv_layer])) if qkv_layer is not None
               else contextlib.nullcontext([]))
    with capture as qkv:
        out = family.body(model)(input_ids=input_ids, attention_mask=attention_mask, **extra)
    return out, qkv


@torch.inference_mode()
def _teacher_forward(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     rows: torch.Tensor, cfg: LossConfig, plan: LayerPlan | None) -> TeacherOutput:
    family = family_of(teacher)
    relations = plan is not None and plan.relations
    out, qkv = encoder_forward(teacher, input_ids, attention_mask, plan, plan.relation_layer if relations else None)
    hidden = out[0]
    nonpad = attention_mask.bool()
    result = TeacherOutput(head_input=family.head_input(teacher, hidden[rows]) if uses_kl(cfg) else None,
                           last_hidden=hidden[nonpad] if cfg.alpha_cos > 0 else None)
    if plan is not None and plan.hidden_states:
        result.hidden = [out.hidden_states[t][nonpad] for t, _ in plan.hidden_pairs]
    if plan is not None and plan.attentions:
        result.attentions = [out.attentions[t] for t, _ in plan.attention_pairs]
    if relations:
        result.qkv = list(qkv)
    return result


def _cloned(value):
    if value is None:
        return None
    return [v.clone() for v in value] if isinstance(value, list) else value.clone()


def teacher_outputs(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, cfg: LossConfig, plan: LayerPlan | None = None) -> TeacherOutput:
    """Teacher forward under inference mode; results cloned so autograd may save them in the student's graph."""
    rows = projection_rows(attention_mask, labels, cfg, "distill")
    out = _teacher_forward(teacher, input_ids, attention_mask, rows, cfg, plan)
    return TeacherOutput(**{name: _cloned(getattr(out, name)) for name in out.__dataclass_fields__})


class DistillationObjective(nn.Module):
    """Wraps the student so the DeepSpeed engine owns exactly its parameters; forward returns the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: LossConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.family = family_of(student)
        # The teacher's projection weights are read at each step but must not become engine parameters.
        self._teacher = [teacher]
        # Layer losses and their projections (trained, checkpointed with the student, not exported).
        self.plan = LayerPlan(cfg, teacher.config, student.config)
        for model in (student, teacher):
            unpadded = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
            if self.plan.relations and unpadded and family_of(model).name == "modernbert":
                raise UserError("loss.alpha_relations with a ModernBERT under flash-attention: its unpadded layout "
                                "hides the batch from the query/key/value projections; load it with sdpa or eager "
                                "attention, or set loss.alpha_relations=0")
        if self.plan.attentions:  # attention probabilities come only from the eager implementation
            for model in (student, teacher):
                model.set_attn_implementation("eager")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher_out: TeacherOutput) -> LossOutput:
        cfg, student = self.cfg, self.student
        nonpad = attention_mask.bool()
        rows = projection_rows(attention_mask, labels, cfg, "distill")
        plan = self.plan
        s_layers = len(self.family.layers(student))
        out, s_qkv = encoder_forward(student, input_ids, attention_mask, plan,
                                     s_layers - 1 if plan.relations else None)
        hidden = out[0]
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
        if plan.hidden_states:
            assert teacher_out.hidden is not None
            per_pair = []
            for i, ((_, s_idx), t_hidden) in enumerate(zip(plan.hidden_pairs, teacher_out.hidden, strict=True)):
                s_hidden = out.hidden_states[s_idx][nonpad]
                if plan.project:
                    s_hidden = plan.projections[i](s_hidden)
                fn = layer_losses.hidden_mse if cfg.hidden_loss == "mse" else layer_losses.hidden_cosine
                per_pair.append(fn(s_hidden, t_hidden))
            hidden_loss = torch.stack(per_pair).mean()
            total = total + cfg.alpha_hidden * hidden_loss
            parts["loss_hidden"] = hidden_loss.detach()
        if plan.relations:
            assert teacher_out.qkv is not None
            fn = layer_losses.relation_kl_lean if cfg.relation_lean else layer_losses.relation_kl
            relation = sum(fn(s_x, t_x, attention_mask, plan.relation_heads)
                           for s_x, t_x in zip(s_qkv, teacher_out.qkv, strict=True))
            total = total + cfg.alpha_relations * relation
            parts["loss_relations"] = relation.detach()
        if plan.attentions:
            assert teacher_out.attentions is not None
            attention = torch.stack([layer_losses.attention_kl(out.attentions[s_idx], t_att, attention_mask)
                                     for (_, s_idx), t_att in zip(plan.attention_pairs, teacher_out.attentions,
                                                                  strict=True)]).mean()
            total = total + cfg.alpha_attention * attention
            parts["loss_attention"] = attention.detach()
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
