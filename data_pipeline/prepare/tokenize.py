"""Tokenizers (load a fast HF tokenizer of any kind, or train one: an uncased WordPiece as BERT's or a byte-level
BPE as RoBERTa's) and the recipe's sequence rules.

Sequence rules (lm_seqs_dataset.py of the original): each sequence is `[CLS] ... [SEP]`; one longer than
max_len is cut into chunks of max_len - 2 (cutting the whole `[CLS] ... [SEP]` sequence, as the original
does) with [CLS]/[SEP] re-inserted where a chunk lacks them; sequences of <= 11 tokens and sequences that
are >= 50 % [UNK] are dropped. `pack` fills a sequence with consecutive segments of one document.

Encoding: special-token strings that occur in the corpus (a literal "[SEP]" in some text) are encoded as
text, never as the special ids, so a corpus cannot inject structure. For BERT-style WordPiece tokenizers
the work goes through per-process caches keyed by whitespace-delimited chunk (lowercased first when the
tokenizer is uncased), so a text's ids are its chunks' cached ids joined: a printable-ASCII chunk is split
like the pre-tokenizer with one regex and its words tokenised by the library's WordPiece model (cached per
word); any other chunk is encoded by the library's full pipeline. Text with other characters is cut where
the BERT pipeline would cut it too (see _encode_mixed). This gives the ids of the library's pipeline on the
whole text (tested against it) at several times its speed. Other tokenizers use the library's batched
`encode_batch_fast`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from distil.common.errors import UserError
from distil.data_pipeline.manifest import SpecialTokens

MIN_SEQUENCE_TOKENS = 12  # the original drops sequences of <= 11 tokens
MAX_UNK_FRACTION = 0.5  # ... and those that are >= 50 % [UNK]
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORD_CACHE_LIMIT = 1_000_000
# ASCII control characters the BERT normalizer deletes (tab, newline and carriage return become spaces).
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A whitespace-delimited chunk (whitespace: what both Python and the BERT pipeline split at) holding a
# character that is not printable ASCII. Anchored at a chunk start, so the scan stays linear.
_NON_ASCII_CHUNK = re.compile(r"(?<![^ \t\n\r])[^ \t\n\r]*?[^\t\n\r\x20-\x7e][^ \t\n\r]*")


# ---------------------------------------------------------------- tokenizers


def load_tokenizer(name_or_dir: str):
    """A fast (Rust-backed) HF tokenizer from a local folder or a hub name (offline: the local cache)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:  # noqa: BLE001 - damaged files raise anything from the tokenizers library
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load tokenizer {name_or_dir!r} ({first_line}); pass a local tokenizer folder, "
            "a cached hub name, or --train-tokenizer VOCAB_SIZE"
        ) from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"tokenizer {name_or_dir!r} is not a fast (tokenizers-backed) tokenizer; pass one that is")
    why = tokenizer_fails(tokenizer)
    if why is not None:
        raise UserError(f"tokenizer {name_or_dir!r} loads but cannot tokenise text ({why}); its files are damaged "
                        "or incomplete: pass an intact tokenizer folder, or --train-tokenizer VOCAB_SIZE")
    return tokenizer


# Letters, digits, punctuation, accents, CJK, symbols and an astral-plane character: text that reaches the unknown
# token of any vocabulary. A damaged tokenizer.json can load and still fail on it (seen: a WordPiece model whose
# [UNK] entry no longer matches, "Missing [UNK] token from the vocabulary").
PROBE_TEXT = "The quick brown fox, 3.14 -- Zürich naïve 東京 ☃ 𝔘 [x]"


def tokenizer_fails(tokenizer) -> str | None:
    """Why `tokenizer` cannot tokenise PROBE_TEXT, or None when it can."""
    try:
        tokenizer(PROBE_TEXT)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return None


def _continuation_tokens(alphabet: set[str]) -> list[str]:
    """`##c` for every character that can continue a word, in a fixed order.

    Passed to the trainer as initial tokens: the `tokenizers` WordPiece trainer otherwise creates them in
    hash-map order, which changes merge tie-breaks and so the vocabulary from run to run
    (huggingface/tokenizers#1794).
    """
    letters = (c for c in alphabet if not c.isspace() and not unicodedata.category(c).startswith("P"))
    return ["##" + c for c in sorted(letters)]


def train_wordpiece(text_batches: Callable[[], Iterable[list[str]]], vocab_size: int):
    """Trains an uncased BERT WordPiece tokenizer; returns a transformers BertTokenizerFast.

    `text_batches()` gives the corpus as batches of texts; it is called twice (alphabet, then training).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    alphabet: set[str] = set()
    for batch in text_batches():
        alphabet.update(normalizer.normalize_str("\n".join(batch)))
    continuation = _continuation_tokens(alphabet)

    def make(model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok

    trained = make(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[*SPECIAL_TOKENS, *continuation], show_progress=False
    )
    trained.train_from_iterator((text for batch in text_batches() for text in batch), trainer)
    # Rebuild from the learned vocabulary so that only the five real specials are added (special) tokens.
    final = make(models.WordPiece(vocab=trained.get_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
    final.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = final.token_to_id("[CLS]"), final.token_to_id("[SEP]")
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=final, do_lower_case=True)


# Special tokens of the RoBERTa / XLM-R layout, in their ids' order: <s> 0, <pad> 1, </s> 2, <unk> 3; <mask> last.
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TOKENIZER_KINDS = ("wordpiece", "bpe")


def train_tokenizer(kind: str, text_batches: Callable[[], Iterable[list[str]]], vocab_size: int):
    """A tokenizer of `kind` (TOKENIZER_KINDS) trained on the corpus: a transformers fast tokenizer whose
    special tokens are those its family's models expect."""
    if kind == "wordpiece":
        return train_wordpiece(text_batches, vocab_size)
    if kind == "bpe":
        return as_saved(train_byte_level_bpe(text_batches, vocab_size))
    raise UserError(f"--train-tokenizer-kind {kind}: choose one of {', '.join(TOKENIZER_KINDS)}")


def as_saved(tokenizer):
    """The tokenizer as its saved folder loads: transformers rebuilds some tokenizers on loading (a byte-level
    BPE's model gets "" for its unset affixes), and the shards must record the hash of what users load."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def roberta_layout(tok, cls):
    """`<s> $A </s>` (pairs `<s> $A </s></s> $B </s>`) and `<mask>` as the last id, as RoBERTa and XLM-R."""
    from tokenizers import AddedToken, processors

    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), add_prefix_space=True)
    return cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
               unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def train_byte_level_bpe(text_batches: Callable[[], Iterable[list[str]]], vocab_size: int):
    """A byte-level BPE as RoBERTa's (every byte in the alphabet, so no text is unknown); returns a
    RobertaTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, special_tokens=list(ROBERTA_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text for batch in text_batches() for text in batch), trainer)
    return roberta_layout(tok, RobertaTokenizerFast)


def tokenizer_json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer_json(tokenizer).encode("utf-8")).hexdigest()


def special_tokens_of(tokenizer, name: str) -> SpecialTokens:
    ids = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise UserError(f"tokenizer {name!r} has no {'/'.join(missing)} token; pass a masked-LM tokenizer (one "
                        "with classification, separator, padding, mask and unknown tokens)")
    return SpecialTokens(**ids)


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _ChunkCacheSpec:
    lowercase: bool
    word: re.Pattern[str]


def _chunk_cache_spec(config: dict) -> _ChunkCacheSpec | None:
    """When the tokenizer is a plain BERT WordPiece pipeline, the regex that splits ASCII text like it."""
    normalizer, pre_tokenizer, model = config.get("normalizer"), config.get("pre_tokenizer"), config.get("model")
    if not (normalizer and pre_tokenizer and model):
        return None
    if normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", False):
        return None
    if pre_tokenizer.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
        return None
    if any(not t.get("special", False) for t in config.get("added_tokens", [])):
        return None  # non-special added tokens are matched in text; leave those to the library
    lowercase = bool(normalizer.get("lowercase", False))
    # BertPreTokenizer on ASCII: split on whitespace, every other non-alphanumeric char is punctuation.
    word = re.compile(r"[a-z0-9]+|[^\sa-z0-9]" if lowercase else r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
    return _ChunkCacheSpec(lowercase, word)


class _Cache(dict):
    """A dict that fills itself: a missing key's value comes from `compute`; cleared when it grows too big.
    Lookups of known keys stay in C (dict subscription), which is what makes the ASCII path fast."""

    def __init__(self, compute: Callable[[str], list[int]]) -> None:
        super().__init__()
        self.compute = compute

    def __missing__(self, key: str) -> list[int]:
        if len(self) >= _WORD_CACHE_LIMIT:
            self.clear()
        value = self[key] = self.compute(key)
        return value


def _without_special_pieces(tokenizer_json_str: str) -> str:
    """A Unigram (SentencePiece) model holds its special tokens as pieces too, and would match a literal "<s>"
    in the text to the special id (whatever its score: the unknown characters the alternative needs cost
    more). With those pieces renamed to strings no text holds, text is encoded as text and every id stays.
    Other models are returned as they are."""
    state = json.loads(tokenizer_json_str)
    model = state.get("model") or {}
    if model.get("type") != "Unigram":
        return tokenizer_json_str
    special = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
    model["vocab"] = [[f"\ue000distil-special-{i}" if piece in special else piece, score]
                      for i, (piece, score) in enumerate(model["vocab"])]
    return json.dumps(state)


class Encoder:
    """Batched text -> ids without special tokens; built in each worker from the tokenizer's JSON."""

    def __init__(self, tokenizer_json_str: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(_without_special_pieces(tokenizer_json_str))
        self.tokenizer.encode_special_tokens = True  # literal "[SEP]" in text is text
        self.spec = _chunk_cache_spec(json.loads(tokenizer_json_str))
        model = self.tokenizer.model
        # word of a printable-ASCII chunk -> ids (the WordPiece model alone: the regex did the rest)
        self.word_cache = _Cache(lambda word: [t.id for t in model.tokenize(word)])
        # printable-ASCII chunk (lowercased if uncased) -> ids
        self.ascii_cache = _Cache(self._ascii_chunk_ids)
        # any other chunk -> ids (the library's whole pipeline)
        self.other_cache = _Cache(lambda chunk: self.tokenizer.encode(chunk, add_special_tokens=False).ids)

    def _ascii_chunk_ids(self, chunk: str) -> list[int]:
        """A printable-ASCII chunk: split like the pre-tokenizer, each word through the WordPiece model
        (cached per word too: "word," and "word." share the work for "word")."""
        assert self.spec is not None
        return list(chain.from_iterable(map(self.word_cache.__getitem__, self.spec.word.findall(chunk))))

    def _encode_ascii(self, text: str) -> list[int]:
        """Printable ASCII (plus tab/newline/CR): str.split() cuts exactly where the pipeline does."""
        assert self.spec is not None
        if self.spec.lowercase:
            text = text.lower()
        return list(chain.from_iterable(map(self.ascii_cache.__getitem__, text.split())))

    def _encode_mixed(self, text: str) -> list[int]:
        """Text with non-ASCII or control characters: chunks holding them are encoded on their own by the
        library (cached per chunk), the ASCII text between them as above.

        A chunk runs from whitespace to whitespace. The BERT normalizer and pre-tokenizer act per character
        and split at whitespace, so encoding the pieces one by one gives the ids of the whole text.
        """
        ids: list[int] = []
        done = 0
        for match in _NON_ASCII_CHUNK.finditer(text):
            if match.start() > done:
                ids += self._encode_ascii(text[done : match.start()])
            ids += self.other_cache[match.group()]
            done = match.end()
        if done < len(text):
            ids += self._encode_ascii(text[done:])
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.spec is None:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        plain, mixed = self._encode_ascii, self._encode_mixed
        return [plain(t) if t.isascii() and not _ASCII_CONTROL.search(t) else mixed(t) for t in texts]


# ---------------------------------------------------------------- sequences


def chunk_sequence(sequence: list[int], cls_id: int, sep_id: int, max_len: int) -> list[list[int]]:
    """The original's divide_into_chunks for one `[CLS] ... [SEP]` sequence."""
    if len(sequence) <= max_len:
        return [sequence]
    step = max_len - 2
    chunks = []
    for start in range(0, len(sequence), step):
        chunk = sequence[start : start + step]
        if chunk[0] != cls_id:
            chunk = [cls_id, *chunk]
        if chunk[-1] != sep_id:
            chunk = [*chunk, sep_id]
        chunks.append(chunk)
    return chunks


def document_sequences(
    segments: list[list[int]], cls_id: int, sep_id: int, max_len: int, pack: bool
) -> Iterator[list[int]]:
    """`[CLS] ... [SEP]` sequences of one document's segment ids, chunked; filtering is separate."""
    if not pack:
        for ids in segments:
            yield from chunk_sequence([cls_id, *ids, sep_id], cls_id, sep_id, max_len)
        return
    budget = max_len - 2
    current: list[int] = []
    for ids in segments:
        if current and len(current) + len(ids) <= budget:
            current += ids
            continue
        if current:
            yield [cls_id, *current, sep_id]
            current = []
        if len(ids) <= budget:
            current = list(ids)
        else:
            yield from chunk_sequence([cls_id, *ids, sep_id], cls_id, sep_id, max_len)
    if current:
        yield [cls_id, *current, sep_id]


def drop_reason(sequence: list[int], unk_id: int) -> str | None:
    """None to keep the sequence, else why the original would drop it."""
    if len(sequence) < MIN_SEQUENCE_TOKENS:
        return "short"
    if sequence.count(unk_id) >= MAX_UNK_FRACTION * len(sequence):
        return "unk"
    return None
