"""Export: a student saved by export_model loads with AutoModelForMaskedLM and runs pipeline("fill-mask")."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from trainer_helpers import tiny_bert
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizerFast, pipeline

from distil.pretrain.config import StudentConfig
from distil.pretrain.export import export_model
from distil.pretrain.models import build_student

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(path) -> BertTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = "the cat dog sat on a mat and ran to house tree big small".split()
    tok.train_from_iterator([" ".join(words)] * 20, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return fast


def test_export_round_trip(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    teacher = tiny_bert(vocab=len(tok))
    student, _ = build_student(teacher, StudentConfig())
    student.half()  # the engine's module may be half precision; the export is fp32
    out = export_model(student, tmp_path / "export", str(tmp_path / "tok"))
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".export.tmp*"))
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    assert type(loaded).__name__ == "DistilBertForMaskedLM" and loaded.dtype == torch.float32
    for name, value in student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.float(), msg=name)
    fill = pipeline("fill-mask", model=loaded, tokenizer=AutoTokenizer.from_pretrained(out))
    preds = fill("the cat sat on the [MASK].")
    assert len(preds) == 5 and {"score", "token_str", "sequence"} <= set(preds[0])
    # exporting again replaces the folder whole
    export_model(student, tmp_path / "export", str(tmp_path / "tok"))
    assert AutoModelForMaskedLM.from_pretrained(out) is not None
