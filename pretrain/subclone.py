"""student.narrow_init=subclone: a student narrower than its teacher starts from a slice of the teacher's weights.

The idea is weight subcloning (Samragh et al., 2023, "Weight subcloning: direct initialization of transformers
using larger pretrained ones"): a narrower network keeps the teacher's most important neurons, so it starts
near the function the teacher computes instead of from noise. The rule here is data-free:

- residual dimensions: the `hidden_size` dimensions with the largest summed |gain| over all of the teacher's
  residual LayerNorms (the embeddings' and each layer's two). In these post-LN encoders the residual stream is
  those LayerNorms' outputs, so the gains set how much each dimension carries. The same dimensions are kept
  everywhere: embeddings, every LayerNorm, every matrix that reads or writes the residual stream, the MLM head.
- attention heads: whole teacher heads (the student keeps the teacher's head size), in each mapped layer the
  heads with the largest ||W_value[head]|| * ||W_out[:, head]||, in their original order;
- feed-forward neurons: in each mapped layer the `intermediate_size` with the largest
  ||W_in[neuron, :]|| * ||W_out[:, neuron]||, in their original order.

No rescaling: measured on a 6 x 384 MiniLM teacher cut to 3 x 192, scaling the matrices that read the residual
stream by sqrt(teacher width / student width) gave a worse held-out masked-LM loss (7.34 against 7.26) before any
training. At the teacher's own widths every index is kept and the student is exactly the layer-copy
initialisation with the MLM head's transform copied and, for a DistilBERT student of BERT, the token-type-0
embedding folded into the positions. ModernBERT (fused query/key/value, gated MLP, pre-LN) is not covered: use
pca or random there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distil.common.errors import UserError
from distil.pretrain import families

SUPPORTED = ("bert", "distilbert", "roberta", "xlm-roberta")


@dataclass
class Layer:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    attn_out: nn.Linear
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_norm: nn.LayerNorm


@dataclass
class Parts:
    words: nn.Embedding
    positions: nn.Embedding
    token_types: nn.Embedding | None
    emb_norm: nn.LayerNorm
    layers: list[Layer]
    head_dense: nn.Linear
    head_norm: nn.LayerNorm
    decoder: torch.Tensor  # the vocabulary projection's weight (the word embeddings when tied)
    head_bias: torch.Tensor | None


def _parts(model: nn.Module) -> Parts:
    """The weights a slice touches; the layers, query/key/value, embeddings and decoder as families.py finds them."""
    family = families.family_of(model)
    if family.name not in SUPPORTED:
        raise UserError(f"student.narrow_init=subclone slices separate query/key/value weights and post-LN "
                        f"LayerNorms, which a {family.title} does not have: set student.narrow_init=pca or random")
    layers = []
    for lay in family.layers(model):
        if family.name == "distilbert":
            rest = (lay.attention.out_lin, lay.sa_layer_norm, lay.ffn.lin1, lay.ffn.lin2, lay.output_layer_norm)
        else:
            rest = (lay.attention.output.dense, lay.attention.output.LayerNorm, lay.intermediate.dense,
                    lay.output.dense, lay.output.LayerNorm)
        layers.append(Layer(*family.qkv(lay), *rest))
    if family.name == "distilbert":
        dense, norm = model.vocab_transform, model.vocab_layer_norm
    elif family.name == "bert":
        dense, norm = model.cls.predictions.transform.dense, model.cls.predictions.transform.LayerNorm
    else:
        dense, norm = model.lm_head.dense, model.lm_head.layer_norm
    emb = family.body(model).embeddings
    return Parts(emb.word_embeddings, emb.position_embeddings, getattr(emb, "token_type_embeddings", None),
                 emb.LayerNorm, layers, dense, norm, *family.decoder(model))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties: the lower index)."""
    return torch.argsort(-scores.cpu(), stable=True)[:k].sort().values


def residual_dims(parts: Parts, width: int) -> torch.Tensor:
    gains = parts.emb_norm.weight.detach().double().abs().clone()
    for layer in parts.layers:
        gains += layer.attn_norm.weight.detach().double().abs() + layer.ffn_norm.weight.detach().double().abs()
    return _top(gains, width)


def top_heads(layer: Layer, head_size: int, n: int) -> torch.Tensor:
    v, o = layer.v.weight.detach().double(), layer.attn_out.weight.detach().double()
    heads = v.shape[0] // head_size
    scores = torch.stack([v[h * head_size:(h + 1) * head_size].norm() * o[:, h * head_size:(h + 1) * head_size].norm()
                          for h in range(heads)])
    return _top(scores, n)


def top_neurons(layer: Layer, n: int) -> torch.Tensor:
    scores = layer.ffn_in.weight.detach().double().norm(dim=1) * layer.ffn_out.weight.detach().double().norm(dim=0)
    return _top(scores, n)


def _linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[rows][:, cols].to(dst.weight.dtype))
    if dst.bias is not None and src.bias is not None:
        dst.bias.copy_(src.bias[rows].to(dst.bias.dtype))


def _norm(dst: nn.LayerNorm, src: nn.LayerNorm, idx: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[idx].to(dst.weight.dtype))
    if dst.bias is not None and src.bias is not None:
        dst.bias.copy_(src.bias[idx].to(dst.bias.dtype))


def check(teacher_config, student_config) -> int:
    """One error line when the student cannot be sliced from this teacher; else the head size both keep."""
    t_hidden, t_heads = int(teacher_config.hidden_size), int(teacher_config.num_attention_heads)
    s_hidden, s_heads = int(student_config.hidden_size), int(student_config.num_attention_heads)
    t_ffn, s_ffn = families.ffn_width(teacher_config), families.ffn_width(student_config)
    for what, s, t in (("hidden_size", s_hidden, t_hidden), ("intermediate_size", s_ffn, t_ffn)):
        if s > t:
            raise UserError(f"student.narrow_init=subclone keeps a subset of the teacher's weights, but "
                            f"student.{what}={s} is wider than the teacher's {t}: set it to {t} or less, or set "
                            "student.narrow_init=random")
    head_size = t_hidden // t_heads
    if s_hidden % head_size:
        raise UserError(f"student.narrow_init=subclone keeps whole teacher heads of size {head_size}: set "
                        f"student.hidden_size to a multiple of {head_size} (not {s_hidden})")
    if s_hidden // s_heads != head_size:
        raise UserError(f"student.narrow_init=subclone keeps whole teacher heads of size {head_size}: set "
                        f"student.num_attention_heads={s_hidden // head_size} for student.hidden_size={s_hidden} "
                        f"(not {s_heads})")
    return head_size


@torch.no_grad()
def subclone(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> dict:
    """Writes every student weight from the teacher's kept dimensions, heads and neurons (see the module's
    docstring). A student without token types (DistilBERT from BERT) gets the teacher's token-type-0 embedding
    added into its positions, as BERT adds it at every position of a single-segment input. Returns what was
    kept, for the log."""
    t, s = _parts(teacher), _parts(student)  # an unsupported family first, then the shapes
    head_size = check(teacher.config, student.config)
    width = s.words.weight.shape[1]
    keep = residual_dims(t, width)
    s.words.weight.copy_(t.words.weight[:, keep].to(s.words.weight.dtype))
    rows = min(s.positions.weight.shape[0], t.positions.weight.shape[0])
    dtype = s.positions.weight.dtype  # the sum in the student's precision (a fp16 teacher's would round)
    positions = t.positions.weight[:rows].to(dtype)
    if s.token_types is None and t.token_types is not None:
        positions = positions + t.token_types.weight[0].to(dtype)
    s.positions.weight[:rows].copy_(positions[:, keep])
    if s.token_types is not None and t.token_types is not None:
        types = min(s.token_types.weight.shape[0], t.token_types.weight.shape[0])
        s.token_types.weight[:types].copy_(t.token_types.weight[:types][:, keep].to(s.token_types.weight.dtype))
    _norm(s.emb_norm, t.emb_norm, keep)
    n_heads = width // head_size
    kept_heads = []
    for s_layer, t_idx in zip(s.layers, layer_map, strict=True):
        tl = t.layers[t_idx]
        heads = top_heads(tl, head_size, n_heads)
        attn = torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads.tolist()])
        for dst, src in ((s_layer.q, tl.q), (s_layer.k, tl.k), (s_layer.v, tl.v)):
            _linear(dst, src, attn, keep)
        _linear(s_layer.attn_out, tl.attn_out, keep, attn)
        _norm(s_layer.attn_norm, tl.attn_norm, keep)
        neurons = top_neurons(tl, s_layer.ffn_in.weight.shape[0])
        _linear(s_layer.ffn_in, tl.ffn_in, neurons, keep)
        _linear(s_layer.ffn_out, tl.ffn_out, keep, neurons)
        _norm(s_layer.ffn_norm, tl.ffn_norm, keep)
        kept_heads.append(heads.tolist())
    _linear(s.head_dense, t.head_dense, keep, keep)
    _norm(s.head_norm, t.head_norm, keep)
    if s.decoder.data_ptr() != s.words.weight.data_ptr():  # untied: the decoder's own kept columns
        s.decoder.copy_(t.decoder[:, keep].to(s.decoder.dtype))
    if s.head_bias is not None and t.head_bias is not None:
        s.head_bias.copy_(t.head_bias.to(s.head_bias.dtype))
    return {"dims": keep.tolist(), "heads": kept_heads, "neurons": s.layers[0].ffn_in.weight.shape[0]}
