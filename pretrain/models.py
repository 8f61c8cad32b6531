"""Teacher loading, student construction and initialisation, and the teacher/student/shards agreement check.

Student initialisation follows the recipe's `extract_distilbert.py`: embeddings, a subset of teacher layers
(the list, or an even-spacing rule that gives [0, 2, 4, 7, 9, 11] for 12 -> 6), and the vocabulary
projector from the teacher's MLM decoder (+ bias); the head's transform only by flag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
)

from distil.common.errors import UserError
from distil.data_pipeline.manifest import Manifest
from distil.pretrain import families, subclone
from distil.pretrain.compat import check_manifest_ids, check_model_fits
from distil.pretrain.config import ArchConfig, StudentConfig, TeacherConfig

log = logging.getLogger(__name__)

NARROW_INIT = ("the student's widths differ from the teacher's: it is initialised randomly (weights cannot be "
               "copied as they are across widths; student.narrow_init=subclone starts it from a slice of the teacher's "
               "weights, pca its embeddings from the teacher's)")
NARROW_INITS = ("random", "pca", "subclone")
RECIPE_DROPOUT = 0.1  # the DistilBERT student's dropouts in the recipe
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loads without transformers' load reports, warnings and progress bars: distil checks what was loaded
    itself and says in one line what is wrong, so the library's report would only bury that line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def even_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included: 12 -> 6 gives [0, 2, 4, 7, 9, 11]."""
    if student_layers < 1 or student_layers > teacher_layers:
        raise UserError(
            f"student.num_layers={student_layers} must be between 1 and the teacher's {teacher_layers} layers"
        )
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(student_layers)]


def resolve_layer_map(cfg: StudentConfig, teacher_layers: int) -> list[int]:
    if cfg.layers is not None:
        layers = list(cfg.layers)
        if not layers:
            raise UserError("student.layers is empty: give teacher layer indices, or null for the default rule")
        bad = [i for i in layers if not 0 <= i < teacher_layers]
        if bad:
            raise UserError(f"student.layers has {bad}: the teacher has layers 0..{teacher_layers - 1}")
        if cfg.num_layers is not None and cfg.num_layers != len(layers):
            raise UserError(
                f"student.num_layers={cfg.num_layers} but student.layers lists {len(layers)}: make them agree"
            )
        return layers
    n = cfg.num_layers if cfg.num_layers is not None else max(1, teacher_layers // 2)
    return even_layer_map(teacher_layers, n)


def load_teacher(cfg: TeacherConfig, *, need_logits: bool, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A frozen masked LM of one of distil's families, in eval mode on `device`, cast to cfg.dtype."""
    from transformers import AutoModelForMaskedLM

    where = cfg.path
    assert where
    local = Path(where)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"teacher.path {where} has no config.json: point it at a saved HF masked-LM folder "
                        f"({families.NAMES})")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load teacher {where!r}: {str(e).splitlines()[0]} "
                        "(a local folder, or a hub name with network access)") from None
    family = families.family_named(config.model_type, f"teacher {where!r}'s model_type")
    with quiet_transformers():
        model, info = AutoModelForMaskedLM.from_pretrained(where, dtype=DTYPES[cfg.dtype], output_loading_info=True)
    head_missing = [k for k in info.get("missing_keys", []) if k.startswith(family.head_prefixes)]
    if head_missing and need_logits:
        raise UserError(
            f"teacher {where!r} has no trained MLM head (missing {head_missing[0]}, ...): a bare encoder cannot "
            f"give teacher logits; use a {family.mlm_class} checkpoint or set loss.alpha_ce=0 and loss.alpha_mse=0"
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def student_config_from_teacher(teacher: BertConfig, cfg: StudentConfig) -> DistilBertConfig:
    """The recipe's DistilBERT for a BERT teacher: the teacher's sizes, half its layers, no token types."""
    n_layers = len(resolve_layer_map(cfg, teacher.num_hidden_layers))
    dim = cfg.hidden_size or teacher.hidden_size
    heads = cfg.num_attention_heads or teacher.num_attention_heads
    if dim % heads:
        raise UserError(f"student.hidden_size={dim} must be divisible by student.num_attention_heads={heads}")
    return DistilBertConfig(
        vocab_size=teacher.vocab_size,
        max_position_embeddings=teacher.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=heads,
        dim=dim,
        hidden_dim=cfg.intermediate_size or teacher.intermediate_size,
        dropout=RECIPE_DROPOUT if cfg.dropout is None else cfg.dropout,
        attention_dropout=RECIPE_DROPOUT if cfg.attention_dropout is None else cfg.attention_dropout,
        activation=teacher.hidden_act,
        initializer_range=teacher.initializer_range,
        pad_token_id=teacher.pad_token_id,
        tie_word_embeddings=getattr(teacher, "tie_word_embeddings", True),
    )


@torch.no_grad()
def _copy(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    for name in ("weight", "bias"):
        d, s = getattr(dst, name, None), getattr(src, name, None)
        if d is not None and s is not None:
            d.copy_(s.to(d.dtype))


@torch.no_grad()
def init_student_from_teacher(student: DistilBertForMaskedLM, teacher: BertForMaskedLM, layer_map: list[int],
                              *, copy_vocab_transform: bool = False, fold_token_type: bool = False) -> None:
    """Copy BERT teacher weights into a DistilBERT student (the recipe's extract_distilbert.py mapping)."""
    t_emb, s_emb = teacher.bert.embeddings, student.distilbert.embeddings
    _copy(s_emb.word_embeddings, t_emb.word_embeddings)
    _copy(s_emb.position_embeddings, t_emb.position_embeddings)
    if fold_token_type:
        # BERT adds token_type_embeddings[0] at every position of a single-segment input; DistilBERT has no
        # token types, so folding it into the positions makes the student's embeddings equal the teacher's.
        s_emb.position_embeddings.weight += t_emb.token_type_embeddings.weight[0].to(s_emb.position_embeddings.weight.dtype)
    _copy(s_emb.LayerNorm, t_emb.LayerNorm)
    for s_idx, t_idx in enumerate(layer_map):
        t, s = teacher.bert.encoder.layer[t_idx], student.distilbert.transformer.layer[s_idx]
        _copy(s.attention.q_lin, t.attention.self.query)
        _copy(s.attention.k_lin, t.attention.self.key)
        _copy(s.attention.v_lin, t.attention.self.value)
        _copy(s.attention.out_lin, t.attention.output.dense)
        _copy(s.sa_layer_norm, t.attention.output.LayerNorm)
        _copy(s.ffn.lin1, t.intermediate.dense)
        _copy(s.ffn.lin2, t.output.dense)
        _copy(s.output_layer_norm, t.output.LayerNorm)
    head = teacher.cls.predictions
    if student.vocab_projector.weight is not s_emb.word_embeddings.weight:  # untied: copy the decoder too
        student.vocab_projector.weight.copy_(head.decoder.weight.to(student.vocab_projector.weight.dtype))
    student.vocab_projector.bias.copy_(head.bias.to(student.vocab_projector.bias.dtype))
    if copy_vocab_transform:
        _copy(student.vocab_transform, head.transform.dense)
        _copy(student.vocab_layer_norm, head.transform.LayerNorm)


def _position_embeddings(model: torch.nn.Module) -> torch.nn.Embedding | None:
    emb = getattr(model.base_model, "embeddings", None)
    return getattr(emb, "position_embeddings", None)


@torch.no_grad()
def init_narrow_embeddings(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    """student.narrow_init=pca: the teacher's word embeddings, centred, projected onto their top `width`
    principal directions (computed in fp64) and rescaled to the teacher's standard deviation; its position
    embeddings through the same projection and scale (they are added to the words); the MLM decoder tied to
    the words or given them; the MLM output bias copied (the vocabulary's frequencies). The layers stay
    random. Returns the share of the teacher's word-embedding variance the projection keeps."""
    t_words, s_words = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    width = s_words.shape[1]
    words = t_words.detach().double()
    mean = words.mean(0)
    centred = words - mean
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)  # ascending
    basis = eigvecs[:, -width:].flip(1)  # (teacher width, student width), orthonormal columns
    projected = centred @ basis
    scale = words.std() / projected.std()
    s_words.copy_((projected * scale).to(s_words.dtype))
    t_pos, s_pos = _position_embeddings(teacher), _position_embeddings(student)
    if t_pos is not None and s_pos is not None and s_pos.weight.shape[0] <= t_pos.weight.shape[0]:
        rows = s_pos.weight.shape[0]
        s_pos.weight.copy_((t_pos.weight[:rows].double() @ basis * scale).to(s_pos.weight.dtype))
    t_bias = families.family_of(teacher).decoder(teacher)[1]
    s_decoder, s_bias = families.family_of(student).decoder(student)
    if s_decoder.data_ptr() != s_words.data_ptr():  # an untied decoder gets the projected words too
        s_decoder.copy_(s_words)
    if t_bias is not None and s_bias is not None and t_bias.shape == s_bias.shape:
        s_bias.copy_(t_bias.to(s_bias.dtype))
    return float(eigvals[-width:].sum() / eigvals.sum())


def _start_narrow(student: torch.nn.Module, teacher: torch.nn.Module, cfg: StudentConfig,
                  layer_map: list[int]) -> None:
    if cfg.narrow_init == "random":
        log.warning(NARROW_INIT)
        return
    if cfg.narrow_init == "subclone":
        kept = subclone.subclone(student, teacher, layer_map)
        log.info("the student's widths differ from the teacher's: it starts from the teacher's layers %s cut to "
                 "%d of %d residual dimensions, heads %s and %d feed-forward neurons a layer (student.narrow_init=subclone)",
                 layer_map, len(kept["dims"]), teacher.get_input_embeddings().weight.shape[1], kept["heads"],
                 kept["neurons"])
        return
    width, t_width = student.get_input_embeddings().weight.shape[1], teacher.get_input_embeddings().weight.shape[1]
    if width > t_width:
        raise UserError(f"student.narrow_init=pca projects the teacher's {t_width}-wide embeddings onto fewer "
                        f"directions; this student is {width} wide: set student.narrow_init=random")
    kept = init_narrow_embeddings(student, teacher)
    log.info("the student's widths differ from the teacher's: its embeddings start from the teacher's top %d "
             "principal directions (%.1f%% of their variance), its layers randomly", width, 100 * kept)


def build_student(teacher: torch.nn.Module, cfg: StudentConfig) -> tuple[torch.nn.Module, list[int]]:
    """A fp32 student masked LM built from the teacher; initialised from it unless cfg says random.

    BERT -> DistilBERT follows the recipe's weight mapping; a student of the teacher's own family is the
    teacher's architecture with the mapped layers, everything else (embeddings, final norm, MLM head) copied.
    """
    if cfg.narrow_init not in NARROW_INITS:
        raise UserError(f"student.narrow_init={cfg.narrow_init!r} is not one of {', '.join(NARROW_INITS)}: set one "
                        "of those")
    t_family = families.family_of(teacher)
    s_family = families.student_family(t_family, cfg.family)
    layer_map = resolve_layer_map(cfg, teacher.config.num_hidden_layers)
    widths = {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
              "intermediate_size": cfg.intermediate_size}
    if s_family.name == "distilbert" and t_family.name == "bert":
        student = DistilBertForMaskedLM(student_config_from_teacher(teacher.config, cfg))
        if cfg.init_from_teacher and not families.same_widths(teacher.config, student.config):
            _start_narrow(student, teacher, cfg, layer_map)
        elif cfg.init_from_teacher:
            init_student_from_teacher(student, teacher, layer_map, copy_vocab_transform=cfg.copy_vocab_transform,
                                      fold_token_type=cfg.fold_token_type_embeddings)
        return student, layer_map
    if cfg.fold_token_type_embeddings:
        raise UserError(f"student.fold_token_type_embeddings applies to a BERT -> DistilBERT student only (this "
                        f"one is a {s_family.title}): set it to false")
    config = families.shallower_config(teacher.config, layer_map, cfg.dropout, cfg.attention_dropout, widths)
    student = s_family.model_class()(config).float()
    if cfg.init_from_teacher and not families.same_widths(teacher.config, config):
        _start_narrow(student, teacher, cfg, layer_map)
    elif cfg.init_from_teacher:
        families.copy_layers(student, teacher, layer_map)
    return student, layer_map


def build_mlm_model(arch: ArchConfig, manifest: Manifest) -> torch.nn.Module:
    """A randomly initialised masked LM of `arch.family` for MLM mode, its vocabulary and special ids taken
    from the shards."""
    positions = arch.max_position_embeddings
    if positions < manifest.max_len:
        raise UserError(f"model.max_position_embeddings={positions} is below the shards' "
                        f"max_len {manifest.max_len}: raise it")
    family = families.family_named(arch.family, "model.family")
    sp = manifest.special_tokens
    ids = dict(pad_token_id=sp.pad, bos_token_id=sp.cls, eos_token_id=sp.sep)
    sizes = dict(vocab_size=manifest.vocab_size, hidden_size=arch.hidden_size,
                 num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                 intermediate_size=arch.intermediate_size)
    import transformers

    if family.name == "bert":
        config = BertConfig(**sizes, max_position_embeddings=positions, hidden_dropout_prob=arch.hidden_dropout_prob,
                            attention_probs_dropout_prob=arch.attention_probs_dropout_prob, pad_token_id=sp.pad)
    elif family.name in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if family.name == "roberta" else transformers.XLMRobertaConfig
        config = cls(**sizes, **ids, max_position_embeddings=positions + sp.pad + 1, type_vocab_size=1,
                     hidden_dropout_prob=arch.hidden_dropout_prob,
                     attention_probs_dropout_prob=arch.attention_probs_dropout_prob)
    elif family.name == "distilbert":
        config = DistilBertConfig(vocab_size=manifest.vocab_size, dim=arch.hidden_size, n_layers=arch.num_hidden_layers,
                                  n_heads=arch.num_attention_heads, hidden_dim=arch.intermediate_size,
                                  max_position_embeddings=positions, dropout=arch.hidden_dropout_prob,
                                  attention_dropout=arch.attention_probs_dropout_prob, pad_token_id=sp.pad)
    else:  # modernbert: global attention every third layer, a sliding window elsewhere (its defaults)
        config = transformers.ModernBertConfig(
            **sizes, **ids, cls_token_id=sp.cls, sep_token_id=sp.sep, max_position_embeddings=positions,
            mlp_dropout=arch.hidden_dropout_prob, embedding_dropout=arch.hidden_dropout_prob,
            attention_dropout=arch.attention_probs_dropout_prob, local_attention=arch.local_attention)
    return family.model_class()(config)


def check_compatible(manifest: Manifest, teacher: BertForMaskedLM | None, student: torch.nn.Module | None, *,
                     need_cosine: bool, teacher_path: str | None = None) -> None:
    """Teacher, student and shards must agree on vocabulary and special tokens (else an index error later)."""
    check_manifest_ids(manifest)
    for role, model, path in (("teacher", teacher, teacher_path), ("student", student, None)):
        if model is not None:
            check_model_fits(role, model.config, manifest, tokenizer_path=path,
                             fix=f"prepare the shards with the {role}'s tokenizer (distil prepare --tokenizer "
                                 f"<{role} dir>) or use a matching {role}")
    if need_cosine and teacher is not None and student is not None:
        t_dim, s_dim = teacher.config.hidden_size, student.config.hidden_size
        if t_dim != s_dim:
            raise UserError(f"loss.alpha_cos > 0 needs equal hidden sizes: teacher {t_dim}, student {s_dim}; "
                            "set loss.alpha_cos=0 and use loss.alpha_hidden with loss.hidden_loss=cosine (through a "
                            "learned projection)")


def load_masked_lm(path: str, manifest: Manifest, device: torch.device) -> torch.nn.Module:
    """An exported HF masked-LM folder, checked against the shards, in eval mode on `device`."""
    from transformers import AutoModelForMaskedLM

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model/--teacher {path}: no such folder (give a model folder exported by distil train)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{path} has no config.json: give a folder saved with save_pretrained (a run's export/)")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(folder))
            model, info = AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a masked-LM model folder ({config_type(folder)}): {first}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(f"{path} has no trained masked-LM head or weights (missing {sorted(missing)[0]}, ...): "
                        f"give a masked-LM export of one of the families {families.NAMES}")
    check_model_fits(path, config, manifest, tokenizer_path=path,
                     fix="evaluate on shards prepared with this model's tokenizer (distil prepare --tokenizer <model dir>)")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def config_type(folder: Path) -> str:
    try:
        return "model_type " + repr(json.loads((folder / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError):
        return "unreadable config.json"
