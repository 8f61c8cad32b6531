"""The encoder families distil trains: how each one's masked LM is laid out, built and initialised.

Every family gives the same four things, which are all the training loop needs:

- `body(model)`: the encoder, called as `body(input_ids=..., attention_mask=...)[0]` for the last hidden states;
- `head_input(model, hidden)`: the MLM head up to (not including) the vocabulary projection;
- `decoder(model)`: the projection's weight and bias, for the fused KL + CE kernel;
- `layer_key`: where a layer's index sits in the state-dict keys, to build a shallower student of the same
  family by copying whole layers (embeddings, final norm and MLM head as they are).

What differs between families (each handled here, and nowhere else):

| family | special tokens | token types | positions |
|---|---|---|---|
| bert | [CLS] [SEP] [PAD] [MASK] | type 0 embedding added | learned, from 0 |
| distilbert | as bert | none | learned, from 0 |
| roberta, xlm-roberta | <s> </s> <pad> <mask> | one type (type_vocab_size 1) | learned, from pad id + 1 |
| modernbert | as its tokenizer says | none | rotary; local/global attention layers |

The student's family follows the teacher's (a BERT teaches a DistilBERT, as the recipe; any other family
teaches a shallower model of its own family) unless `student.family` names another that can be initialised
from it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distil.common.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str  # the model_type transformers writes in config.json
    title: str
    mlm_class: str  # transformers class name of the masked LM
    body_attr: str  # the encoder's attribute on the masked LM
    head_prefixes: tuple[str, ...]  # state-dict prefixes of the MLM head (missing: no teacher logits)
    layer_key: re.Pattern[str]  # a layer's state-dict key; group 2 is its index
    head_input: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    decoder: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    position_offset: Callable[[object], int] = lambda config: 0  # positions lost to the padding offset
    layers: Callable[[nn.Module], nn.ModuleList] = lambda model: model  # the encoder's layers, in order
    qkv: Callable[[nn.Module], tuple[nn.Module, ...]] = lambda layer: ()  # a layer's query/key/value
    # projections: three Linears, or one fused Linear whose output holds the three side by side (ModernBERT)

    def body(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.body_attr)

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.mlm_class)


def _bert_head(model, hidden):
    return model.cls.predictions.transform(hidden)


def _bert_decoder(model):
    return model.cls.predictions.decoder.weight, model.cls.predictions.bias


def _distilbert_head(model, hidden):
    return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))


def _distilbert_decoder(model):
    return model.vocab_projector.weight, model.vocab_projector.bias


def _roberta_head(model, hidden):
    head = model.lm_head
    return head.layer_norm(nn.functional.gelu(head.dense(hidden)))


def _roberta_decoder(model):
    return model.lm_head.decoder.weight, model.lm_head.decoder.bias


def _modernbert_head(model, hidden):
    return model.head(hidden)


def _modernbert_decoder(model):
    return model.decoder.weight, model.decoder.bias


def _roberta_offset(config) -> int:
    # RoBERTa numbers positions from padding_idx + 1: max_position_embeddings 514 holds 512 tokens.
    return int(config.pad_token_id) + 1


def _bert_qkv(layer):
    return layer.attention.self.query, layer.attention.self.key, layer.attention.self.value


_ROBERTA = dict(body_attr="roberta", head_prefixes=("lm_head.",),
                layer_key=re.compile(r"^(roberta\.encoder\.layer\.)(\d+)(\..+)$"),
                head_input=_roberta_head, decoder=_roberta_decoder, position_offset=_roberta_offset,
                layers=lambda model: model.roberta.encoder.layer, qkv=_bert_qkv)

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "BERT", "BertForMaskedLM", "bert", ("cls.",),
                   re.compile(r"^(bert\.encoder\.layer\.)(\d+)(\..+)$"), _bert_head, _bert_decoder,
                   layers=lambda model: model.bert.encoder.layer, qkv=_bert_qkv),
    "distilbert": Family("distilbert", "DistilBERT", "DistilBertForMaskedLM", "distilbert",
                         ("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
                         re.compile(r"^(distilbert\.transformer\.layer\.)(\d+)(\..+)$"),
                         _distilbert_head, _distilbert_decoder, layers=lambda model: model.distilbert.transformer.layer,
                         qkv=lambda layer: (layer.attention.q_lin, layer.attention.k_lin, layer.attention.v_lin)),
    "roberta": Family("roberta", "RoBERTa", "RobertaForMaskedLM", **_ROBERTA),
    "xlm-roberta": Family("xlm-roberta", "XLM-RoBERTa", "XLMRobertaForMaskedLM", **_ROBERTA),
    "modernbert": Family("modernbert", "ModernBERT", "ModernBertForMaskedLM", "model", ("head.", "decoder."),
                         re.compile(r"^(model\.layers\.)(\d+)(\..+)$"), _modernbert_head, _modernbert_decoder,
                         layers=lambda model: model.model.layers, qkv=lambda layer: (layer.attn.Wqkv,)),
}
NAMES = ", ".join(FAMILIES)


def family_named(name: str, what: str) -> Family:
    """The family `name`, or one line naming the families that work (`what` says where the name came from)."""
    family = FAMILIES.get(name)
    if family is None:
        raise UserError(f"{what} is {name!r}: distil works with the families {NAMES}")
    return family


def family_of(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    return family_named(config.model_type, "the model type")


def usable_positions(config) -> int | None:
    """Tokens a sequence of this model may hold (RoBERTa loses pad id + 1 positions to its offset)."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is None:
        return None
    family = FAMILIES.get(getattr(config, "model_type", ""))
    return int(max_pos) - (family.position_offset(config) if family else 0)


def ffn_width(config) -> int:
    """The feed-forward width (DistilBERT calls it hidden_dim)."""
    return int(config.hidden_dim if config.model_type == "distilbert" else config.intermediate_size)


def dims(config) -> tuple[int, int, int]:
    """(hidden, feed-forward, layers) for the FLOP count; ModernBERT's gated MLP counts as 1.5x its width."""
    ffn = ffn_width(config)
    if config.model_type == "modernbert":
        ffn = int(1.5 * ffn)
    return int(config.hidden_size), int(ffn), int(config.num_hidden_layers)


# ---------------------------------------------------------------- students


def same_widths(teacher_config, student_config) -> bool:
    def widths(c):
        return c.hidden_size, c.num_attention_heads, ffn_width(c)

    return widths(teacher_config) == widths(student_config)


def student_family(teacher: Family, asked: str) -> Family:
    """`student.family`: "auto" (DistilBERT for a BERT teacher, as the recipe; else the teacher's family), the
    teacher's own family, or DistilBERT for a BERT or DistilBERT teacher."""
    if asked == "auto":
        return FAMILIES["distilbert"] if teacher.name == "bert" else teacher
    allowed = [teacher.name] + (["distilbert"] if teacher.name == "bert" else [])
    if asked not in allowed:
        raise UserError(f"student.family={asked!r} cannot be initialised from a {teacher.title} teacher: choose "
                        f"{' or '.join(repr(a) for a in ['auto', *allowed])}")
    return FAMILIES[asked]


def shallower_config(config, layer_map: list[int], dropout: float | None, attention_dropout: float | None,
                     widths: dict[str, int | None] | None = None):
    """The teacher's config with the mapped layers only (same family), dropouts as given (None: the teacher's),
    and `widths` (hidden_size, num_attention_heads, intermediate_size; None: the teacher's)."""
    family = family_of(config)
    student = copy.deepcopy(config)
    student.num_hidden_layers = len(layer_map)
    for key, value in (widths or {}).items():
        if value is not None:
            setattr(student, "hidden_dim" if (key, family.name) == ("intermediate_size", "distilbert") else key, value)
    if student.hidden_size % student.num_attention_heads:
        raise UserError(f"student.hidden_size={student.hidden_size} must be divisible by student.num_attention_heads="
                        f"{student.num_attention_heads}")
    if family.name == "modernbert":
        # Each layer keeps its attention kind (global or sliding window), and its place is fixed by the map.
        student.layer_types = [config.layer_types[i] for i in layer_map]
        if layer_map[0] != 0:
            raise UserError(f"student.layers={layer_map}: a ModernBERT's first layer has no attention norm, so "
                            "the student's first layer must be the teacher's layer 0; start the list with 0")
    drop_keys = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "xlm-roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "distilbert": ("dropout", "attention_dropout"),
                 "modernbert": ("mlp_dropout", "attention_dropout")}[family.name]
    if dropout is not None:
        setattr(student, drop_keys[0], dropout)
        if family.name == "modernbert":
            student.embedding_dropout = dropout
    if attention_dropout is not None:
        setattr(student, drop_keys[1], attention_dropout)
    student.dtype = torch.float32
    return student


@torch.no_grad()
def copy_layers(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> None:
    """Same-family student: every teacher weight outside the layers as it is, student layer i from teacher
    layer layer_map[i]. Every student weight is written (a missing one is a bug, not a silent random init)."""
    family = family_of(teacher)
    source = teacher.state_dict()
    where = {s: t for s, t in enumerate(layer_map)}
    written = set()
    for key, dst in student.state_dict().items():
        match = family.layer_key.match(key)
        src_key = f"{match.group(1)}{where[int(match.group(2))]}{match.group(3)}" if match else key
        dst.copy_(source[src_key].to(dst.dtype))
        written.add(key)
    assert written == set(student.state_dict()), "a student weight was not initialised"
