"""pretrain/evaluate/heldout.py directly: the running tallies over several batches equal one fp64 computation
over all masked positions at once (loss, perplexity, top-1/top-5, KL from the teacher, agreement), and the
held-out split that gives nothing to score is one clear error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from trainer_helpers import tiny_bert

from distil.common.errors import UserError
from distil.pretrain.evaluate.heldout import eval_metrics, run_evaluation

VOCAB = 50


def batches(n: int, seed: int = 0, mask_rate: float = 0.3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (3, 12), generator=g)
        attention = torch.ones_like(ids)
        attention[0, 9:] = 0  # one padded row
        ids[0, 9:] = 0
        masked = (torch.rand(ids.shape, generator=g) < mask_rate) & attention.bool()
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        out.append({"input_ids": torch.where(masked, torch.full_like(ids, 4), ids), "attention_mask": attention,
                    "labels": labels})
    return out


def reference(teacher: torch.nn.Module, student: torch.nn.Module, data: list[dict]) -> dict[str, float]:
    """All masked positions of all batches at once, in fp64."""
    t_logits, s_logits, targets = [], [], []
    with torch.no_grad():
        for b in data:
            at = b["labels"] != -100
            t_logits.append(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[at])
            s_logits.append(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[at])
            targets.append(b["labels"][at])
    t, s, y = torch.cat(t_logits).double(), torch.cat(s_logits).double(), torch.cat(targets)
    log_p_t, log_p_s = t.log_softmax(-1), s.log_softmax(-1)
    ce = -log_p_s.gather(1, y[:, None]).squeeze(1)
    top5 = s.topk(5, dim=-1).indices
    return {"mlm_loss": ce.mean().item(), "top1": (top5[:, 0] == y).double().mean().item(),
            "top5": (top5 == y[:, None]).any(-1).double().mean().item(),
            "kl": (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item(),
            "agree": (s.argmax(-1) == t.argmax(-1)).double().mean().item(),
            "teacher_loss": F.cross_entropy(t, y).item(), "masked": y.numel()}


def test_tallies_over_batches_equal_one_fp64_computation_over_all_masked_positions():
    teacher, student = tiny_bert(VOCAB, layers=2, seed=1).eval(), tiny_bert(VOCAB, layers=1, seed=2).eval()
    data = batches(4)
    results, counts = run_evaluation([("teacher", "t", teacher), ("student", "s", student)], data,
                                     torch.device("cpu"), None, "teacher")
    want = reference(teacher, student, data)
    t_res, s_res = results
    assert counts == {"batches": 4, "sequences": 12, "tokens": 4 * (36 - 3), "masked_tokens": want["masked"]}
    assert (t_res.role, s_res.role) == ("teacher", "student")
    assert t_res.kl_from_teacher is None and t_res.teacher_agreement is None
    assert t_res.mlm_loss == pytest.approx(want["teacher_loss"], rel=1e-5)
    assert s_res.mlm_loss == pytest.approx(want["mlm_loss"], rel=1e-5)
    assert s_res.perplexity == pytest.approx(math.exp(want["mlm_loss"]), rel=1e-5)
    assert s_res.top1_accuracy == pytest.approx(want["top1"]) and s_res.top5_accuracy == pytest.approx(want["top5"])
    assert s_res.kl_from_teacher == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert s_res.teacher_agreement == pytest.approx(want["agree"])
    assert s_res.masked_tokens == want["masked"] and s_res.num_parameters == student.num_parameters()
    # the first batch is warm-up: throughput counts the other three
    assert s_res.tokens_per_s is not None and s_res.tokens_per_s > 0
    metrics = eval_metrics(s_res)
    assert metrics["eval_mlm_loss"] == s_res.mlm_loss and "eval_kl_from_teacher" in metrics
    assert "eval_kl_from_teacher" not in eval_metrics(t_res)  # None: not logged


def test_max_batches_stops_the_read_and_students_alone_have_no_teacher_metrics():
    student = tiny_bert(VOCAB, layers=1, seed=2).eval()
    results, counts = run_evaluation([("s", "s", student)], batches(5), torch.device("cpu"), 2, None)
    assert counts["batches"] == 2
    assert results[0].role == "student" and results[0].kl_from_teacher is None


def test_an_empty_split_or_one_without_masked_tokens_is_one_clear_error():
    student = tiny_bert(VOCAB, layers=1, seed=2).eval()
    with pytest.raises(UserError, match="--holdout-fraction"):
        run_evaluation([("s", "s", student)], [], torch.device("cpu"), None, None)
    with pytest.raises(UserError, match="no masked tokens"):
        run_evaluation([("s", "s", student)], batches(2, mask_rate=0.0), torch.device("cpu"), None, None)
