"""The training configuration: one typed dataclass tree, built from a YAML file plus `key=value` overrides.

OmegaConf checks keys and types against the dataclasses (an unknown key or a value of the wrong type is an
error); `validate` checks the values that types cannot (ranges, choices, combinations). Every problem is a
`UserError` with one line naming the key to change. Nothing below the entry point reads the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from distil.common.config import load_structured
from distil.common.errors import UserError
from distil.data_pipeline.masking import MaskingConfig
from distil.pretrain.tracking.config import TrackingConfig

MODES = ("distill", "mlm")
PRECISIONS = ("fp32", "fp16", "bf16")
TEACHER_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class TeacherConfig:
    path: str | None = None  # local HF masked-LM folder or a hub name (distill mode); families: bert, roberta,
    # xlm-roberta, distilbert, modernbert
    dtype: str = "fp16"  # fp16 | bf16 | fp32; fp16 as the recipe (`teacher.half()`)


@dataclass
class StudentConfig:
    family: str = "auto"  # auto: DistilBERT for a BERT teacher (the recipe), else the teacher's own family
    layers: list[int] | None = None  # teacher layer per student layer; None: the recipe's even-spacing rule
    num_layers: int | None = None  # None: half the teacher's layers
    init_from_teacher: bool = True  # False: random initialisation (the paper's ablation); a student whose
    # widths differ from the teacher's starts as narrow_init says
    hidden_size: int | None = None  # None: the teacher's width (the recipe); narrower students, e.g. 384
    num_attention_heads: int | None = None  # None: the teacher's
    intermediate_size: int | None = None  # feed-forward width; None: the teacher's (4 x hidden for BERT-base)
    narrow_init: str = "random"  # a student narrower than its teacher: random; pca (the teacher's word and
    # position embeddings projected onto their top principal directions, its MLM output bias copied; layers random);
    # or subclone (the teacher's most important residual dimensions, heads and neurons: pretrain/subclone.py)
    copy_vocab_transform: bool = False  # also copy the teacher MLM head's transform (dense + LayerNorm)
    fold_token_type_embeddings: bool = False  # add the teacher's token-type-0 embedding into positions
    dropout: float | None = None  # None: the recipe's 0.1 for a DistilBERT student, else the teacher's own
    attention_dropout: float | None = None


@dataclass
class ArchConfig:
    """The masked LM trained in MLM mode (a teacher pretrained from scratch); vocabulary and special ids come
    from the shards."""

    family: str = "bert"  # bert | roberta | xlm-roberta | distilbert | modernbert
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    local_attention: int = 128  # modernbert only: the sliding window of its local-attention layers


@dataclass
class DataConfig:
    shards: str | None = None  # a folder made by `distil prepare` (or its manifest path / URL)
    batch_size: int | None = 5  # sequences per micro-batch per rank (the recipe: 5)
    max_tokens: int | None = None  # or a token budget per micro-batch (then batch_size must be null)
    group_by_size: bool = True
    num_workers: int = 0
    shuffle_buffer: int = 1000
    pad_multiple: int = 8
    masking: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class LossConfig:
    temperature: float = 2.0
    alpha_ce: float = 5.0  # KL(teacher || student) * T^2: the recipe's name for the distillation loss
    alpha_mlm: float = 2.0  # cross-entropy on masked tokens
    alpha_cos: float = 1.0  # 1 - cos(last hidden states) over non-pad tokens
    alpha_mse: float = 0.0  # MSE between student and teacher logits on the KL rows (off in the recipe)
    restrict_ce_to_mask: bool = False  # KL only on masked tokens instead of every non-pad token
    # Losses across widths and depths (pretrain/layer_losses.py; all off in the recipe):
    alpha_hidden: float = 0.0  # hidden states through a learned projection (TinyBERT), on mapped layers
    hidden_loss: str = "mse"  # mse (TinyBERT) | cosine
    hidden_layers: list[int] | None = None  # teacher layer (1-based) per student layer, e.g. 12 -> 6:
    # [2, 4, 6, 8, 10, 12]; None: the teacher's last layer for the student's last
    hidden_embeddings: bool = False  # also the embedding outputs
    alpha_relations: float = 0.0  # self-attention relations Q-Q, K-K, V-V (MiniLMv2), one teacher layer
    # against the student's last layer
    relation_layer: int | None = None  # that teacher layer (1-based); None: its last
    relation_heads: int | None = None  # relation heads (must divide both hidden sizes); None: the teacher's heads
    relation_lean: bool = True  # one relation head at a time, recomputed in the backward pass (less memory)
    alpha_attention: float = 0.0  # attention probabilities on the mapped layers (TinyBERT; equal head counts)
    chunk_size: int | None = None  # rows per chunk of the fused vocabulary projection (None: kernel default)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.0  # never applied to biases and LayerNorm weights
    max_grad_norm: float = 5.0


@dataclass
class ScheduleConfig:
    warmup_fraction: float = 0.05  # linear warm-up over this share of all steps, then linear decay to 0
    warmup_steps: int | None = None  # overrides warmup_fraction when set


@dataclass
class EngineConfig:
    ds_config: str = "cpu_zero2"  # a path (to the working directory, then the shipped root) or a shipped name
    zero_stage: int = 2
    precision: str = "fp16"  # fp32 | fp16 (dynamic loss scale) | bf16
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # if set: must equal batch_size x accumulation x world size
    collective_timeout_s: float = 600.0  # a collective (or the rendezvous) waiting longer fails the run


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (0: only at the end)
    keep: int = 3  # keep the last K complete checkpoints
    dir: str | None = None  # None: <run.output_dir>/checkpoints


@dataclass
class RunConfig:
    output_dir: str = "runs/distil"
    seed: int = 56
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; None: epochs x updates per epoch
    log_every: int = 10
    max_nonfinite_steps: int = 10  # act after this many non-finite losses in a row (one when each is applied)
    on_nonfinite: str = "stop"  # "stop": end the run (exit 1); "rollback": reload the newest intact checkpoint,
    # skip the batches since it, go on
    max_rollbacks: int = 3  # with on_nonfinite=rollback: stop as "stop" does at the next streak after these
    export: bool = True  # export the model in HF format at the end
    stop_after_steps: int | None = None  # stop as on SIGTERM (checkpoint, exit) after this many steps of this
    # process: for time-sliced jobs that resubmit themselves with --resume auto
    time_limit_minutes: float | None = None  # past this (from the start of the command), checkpoint at the
    # next update boundary and exit 3, "more to do" (scheduled jobs, scheduler windows)
    peak_tflops: float | None = None  # per-device peak for MFU; None: a table of known GPUs (no MFU on CPU)


@dataclass
class TrainConfig:
    mode: str = "distill"  # distill | mlm (pretrain a teacher of model.family, no teacher needed)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    model: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (a path or a shipped name; optional) + dotlist overrides -> a validated TrainConfig."""
    _refuse_old_section(path, overrides)
    cfg = load_structured(TrainConfig, path, overrides, sections="sections (mode, teacher, data, ...)",
                          example="run.max_steps=100")
    validate(cfg)
    return cfg


def _refuse_old_section(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> None:
    """Configs written before several families existed had a `bert:` section; say how to move it."""
    from omegaconf import OmegaConf

    from distil.common import assets

    old = [o for o in overrides if o.startswith("bert.")]
    if path is not None:
        try:
            raw = OmegaConf.load(assets.config_path(path))
        except Exception:  # not YAML, or missing: load_structured says so in its own words
            raw = None
        if raw is not None and hasattr(raw, "keys") and "bert" in raw.keys():
            old.append(str(assets.config_path(path)))
    if old:
        raise UserError(f"{old[0]}: the `bert:` section is now `model:` (with model.family, default bert); "
                        "rename bert.* keys to model.*")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: TrainConfig) -> None:
    """Value checks that types cannot express; each failure names the key to change."""
    _require(cfg.mode in MODES, f"mode={cfg.mode!r}: choose one of {', '.join(MODES)}")
    if cfg.mode == "distill":
        _require(bool(cfg.teacher.path), "teacher.path is required in distill mode (a BERT masked-LM dir or hub name)")
    _require(cfg.teacher.dtype in TEACHER_DTYPES, f"teacher.dtype={cfg.teacher.dtype!r}: choose fp16, bf16 or fp32")
    _require(bool(cfg.data.shards), "data.shards is required: a folder made by `distil prepare`")
    d = cfg.data
    _require((d.batch_size is None) != (d.max_tokens is None),
             "set exactly one of data.batch_size and data.max_tokens (the other to null)")
    _require(d.batch_size is None or d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    _require(d.max_tokens is None or d.max_tokens >= 8, f"data.max_tokens={d.max_tokens} must be >= 8")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    _require(d.pad_multiple >= 1, f"data.pad_multiple={d.pad_multiple} must be >= 1")
    d.masking.validate()
    loss = cfg.loss
    _require(loss.temperature > 0, f"loss.temperature={loss.temperature} must be > 0")
    alphas = ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse", "alpha_hidden", "alpha_relations", "alpha_attention")
    for name in alphas:
        _require(getattr(loss, name) >= 0, f"loss.{name}={getattr(loss, name)} must be >= 0")
    if cfg.mode == "distill":
        _require(sum(getattr(loss, name) for name in alphas) > 0, "all loss.alpha_* are 0: nothing to train")
    _require(loss.hidden_loss in ("mse", "cosine"), f"loss.hidden_loss={loss.hidden_loss!r}: choose mse or cosine")
    _require(loss.chunk_size is None or loss.chunk_size >= 1, "loss.chunk_size must be >= 1 or null")
    o = cfg.optim
    _require(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two values in [0, 1)")
    _require(o.eps > 0 and o.weight_decay >= 0, "optim.eps must be > 0 and optim.weight_decay >= 0")
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 disables clipping)")
    s = cfg.schedule
    _require(0 <= s.warmup_fraction < 1, f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    _require(s.warmup_steps is None or s.warmup_steps >= 0, "schedule.warmup_steps must be >= 0 or null")
    e = cfg.engine
    _require(e.zero_stage in (0, 1, 2), f"engine.zero_stage={e.zero_stage}: choose 0, 1 or 2")
    _require(e.precision in PRECISIONS, f"engine.precision={e.precision!r}: choose fp32, fp16 or bf16")
    _require(e.gradient_accumulation_steps >= 1, "engine.gradient_accumulation_steps must be >= 1")
    _require(e.global_batch_size is None or e.global_batch_size >= 1, "engine.global_batch_size must be >= 1")
    _require(e.collective_timeout_s > 0, f"engine.collective_timeout_s={e.collective_timeout_s} must be > 0")
    _require(e.global_batch_size is None or d.batch_size is not None,
             "engine.global_batch_size needs data.batch_size (with data.max_tokens batches vary in size)")
    c = cfg.checkpoint
    _require(c.every >= 0 and c.keep >= 1, "checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    r = cfg.run
    _require(r.epochs >= 1, f"run.epochs={r.epochs} must be >= 1")
    _require(r.max_steps is None or r.max_steps >= 1, f"run.max_steps={r.max_steps} must be >= 1 or null")
    _require(r.log_every >= 1 and r.max_nonfinite_steps >= 1, "run.log_every and run.max_nonfinite_steps must be >= 1")
    _require(r.stop_after_steps is None or r.stop_after_steps >= 1, "run.stop_after_steps must be >= 1 or null")
    _require(r.on_nonfinite in ("stop", "rollback"), f"run.on_nonfinite={r.on_nonfinite!r} must be stop or rollback")
    _require(r.max_rollbacks >= 0, f"run.max_rollbacks={r.max_rollbacks} must be >= 0")
    _require(r.peak_tflops is None or r.peak_tflops > 0, "run.peak_tflops must be > 0 or null")
    _require(r.time_limit_minutes is None or r.time_limit_minutes > 0, "run.time_limit_minutes must be > 0 or null")
    st = cfg.student
    _require(st.num_layers is None or st.num_layers >= 1, "student.num_layers must be >= 1 or null")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
        _require(getattr(st, key) is None or getattr(st, key) >= 1, f"student.{key} must be >= 1 or null")
    _require(all(v is None or 0 <= v < 1 for v in (st.dropout, st.attention_dropout)),
             "student.dropout and student.attention_dropout must be in [0, 1) or null")
    cfg.tracking.validate()
    b = cfg.model
    _require(b.hidden_size % b.num_attention_heads == 0,
             f"model.hidden_size={b.hidden_size} must be divisible by model.num_attention_heads={b.num_attention_heads}")
    if cfg.mode == "mlm":
        from distil.pretrain.families import family_named

        family_named(b.family, "model.family")
    _require(b.local_attention >= 2 and b.local_attention % 2 == 0,
             f"model.local_attention={b.local_attention} must be an even number >= 2")


def check_batch_arithmetic(cfg: TrainConfig, world_size: int) -> int:
    """The global batch in sequences (micro-batch x accumulation x world size); checks a stated one agrees."""
    accum = cfg.engine.gradient_accumulation_steps
    if cfg.data.batch_size is None:
        return 0
    made = cfg.data.batch_size * accum * world_size
    want = cfg.engine.global_batch_size
    if want is not None and want != made:
        hint = ""
        if want % (cfg.data.batch_size * world_size) == 0:
            hint = f"; engine.gradient_accumulation_steps={want // (cfg.data.batch_size * world_size)} would make it"
        raise UserError(
            f"engine.global_batch_size={want} but data.batch_size={cfg.data.batch_size} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {made}{hint}"
        )
    return made


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.schedule.warmup_steps is not None:
        return min(cfg.schedule.warmup_steps, total_steps)
    return int(math.ceil(cfg.schedule.warmup_fraction * total_steps))
