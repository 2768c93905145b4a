"""Project tokenizer: a tiny word-level tokenizer for the synthetic data, and a loader for any local tokenizer.

Why word-level: the synthetic corpus has ~100 distinct words, so one token per word keeps sequences short and
answers decode exactly. Text is lowercased, whitespace is collapsed, words carry a leading "▁" (Metaspace) and
punctuation is split off as its own token; the Metaspace decoder then restores spaces exactly, so
``decode(encode("there are two objects: a red circle"))`` returns the same (lowercase) string.

Fixed phrases (``phrases``): a prompt that repeats word for word in every turn, like LLaVA's short-answer
instruction, can be one token, as a BPE tokenizer would merge it given enough text. It carries no information, and
as ten word tokens after each of six questions it was a third of every synthetic training sequence.

Inflections (``inflections``): "circles" as its own word is a token the model must learn apart from "circle", from
the few questions that use the plural; a from-scratch decoder has no pretraining to tie them. An inflected word
given with its stem is split into the stem's token and a suffix token ("▁circle" + "s"), as a subword tokenizer
would, and decodes back to "circles".

Special tokens have fixed ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<image>`` 4. The tokenizer adds
no special tokens by itself (no post-processor); the chat template in :mod:`mmoe.data.template` places them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from mmoe.constants import IMAGE_TOKEN

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
MAX_VOCAB = 512
MODEL_MAX_LENGTH = 4096
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


def _inflection_pattern(inflections: Mapping[str, str]) -> str:
    """A regex matching the suffix of each inflected word (after its stem), anchored to whole words."""
    parts = []
    for word, stem in sorted(inflections.items()):
        word, stem = word.lower(), stem.lower()
        if not (stem and re.fullmatch(r"[a-z]+", word) and word.startswith(stem) and len(word) > len(stem)):
            raise ValueError(f"train_tokenizer: inflection {word!r} -> {stem!r} must be a lowercase word that "
                             "starts with its stem and is longer")
        parts.append(f"(?<=▁{re.escape(stem)}){re.escape(word[len(stem):])}$")
    return "|".join(parts)


def _pre_tokenizer(inflections: Mapping[str, str] | None = None) -> pre_tokenizers.PreTokenizer:
    steps = [
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation("isolated"),
    ]
    if inflections:
        steps.append(pre_tokenizers.Split(Regex(_inflection_pattern(inflections)), behavior="isolated"))
    return pre_tokenizers.Sequence(steps)


def build_word_vocab(texts: Iterable[str], max_vocab: int = MAX_VOCAB,
                     inflections: Mapping[str, str] | None = None) -> dict[str, int]:
    """Count pre-tokenised words and assign ids by (frequency desc, word asc) so the result is deterministic."""
    norm, pre = _normalizer(), _pre_tokenizer(inflections)
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: expected str texts, got {type(text).__name__}")
        for (
            special
        ) in SPECIAL_TOKENS:  # special tokens are matched before normalisation, never counted as words
            text = text.replace(special, " ")
        counts.update(word for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= max_vocab:
            raise ValueError(
                f"train_tokenizer: corpus has more than {max_vocab - len(SPECIAL_TOKENS)} distinct words; "
                "this word-level tokenizer is meant for the small synthetic corpus"
            )
        vocab[word] = len(vocab)
    return vocab


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, max_vocab: int = MAX_VOCAB,
                    phrases: Iterable[str] = (), inflections: Mapping[str, str] | None = None):
    """Build the word-level tokenizer from ``texts`` and save it (HF format) into ``out_dir``; returns it loaded.

    Each of ``phrases`` becomes a single token wherever it occurs (case and spacing as the normaliser sees them;
    the words stay in the vocabulary on their own too). Each of ``inflections`` (inflected word -> stem, e.g.
    ``{"circles": "circle"}``) is split into the stem's token and a suffix token.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` so that both
    ``AutoTokenizer.from_pretrained(out_dir)`` and ``PreTrainedTokenizerFast.from_pretrained(out_dir)`` work.
    """
    vocab = build_word_vocab(texts, max_vocab, inflections)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer(inflections)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    phrases = list(phrases)
    fixed = [_normalizer().normalize_str(p) for p in phrases]
    if any(len(p.split()) < 2 for p in fixed):
        raise ValueError(f"train_tokenizer: phrases must have at least two words, got {phrases!r}")
    # matched on normalised text; lstrip takes the space before the phrase into it (no lone "▁" token)
    tok.add_tokens([AddedToken(p, normalized=True, lstrip=True) for p in fixed])

    return _save_tokenizer(tok, out_dir)


def _save_tokenizer(tok: Tokenizer, out_dir: str | Path):
    """Write ``tokenizer.json`` + the transformers config files into ``out_dir``; return it loaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    specials = {
        "pad_token": PAD_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    config = {
        **specials,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "extra_special_tokens": [IMAGE_TOKEN],  # transformers >= 5
        "additional_special_tokens": [IMAGE_TOKEN],  # transformers 4.x
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {**specials, "additional_special_tokens": [IMAGE_TOKEN]})
    return load_tokenizer(out)


def template_strings() -> tuple[str, ...]:
    """The fixed strings of the chat template and the prompts inference uses; every tokenizer mmoe trains
    must encode them without ``<unk>`` (a template marker read as ``<unk>`` silently breaks every sample)."""
    from mmoe.data.template import ASSISTANT_PREFIX, CAPTION_PROMPT, SHORT_ANSWER_SUFFIX, USER_PREFIX

    return (USER_PREFIX, ASSISTANT_PREFIX, SHORT_ANSWER_SUFFIX, CAPTION_PROMPT)


def check_template_tokens(tokenizer, strings: Iterable[str] | None = None, where: str = "tokenizer") -> None:
    """Raise ValueError naming the string when a template string encodes to (or through) ``<unk>``."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    for text in strings if strings is not None else template_strings():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if unk in ids:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"{where}: the chat-template string {text!r} tokenizes to {pieces} with "
                             f"{UNK_TOKEN}; train the tokenizer with the template strings (data_scripts "
                             "converters and mmoe.data.tokenizer.train_dataset_tokenizer add them)")


def count_words(texts: Iterable[str]) -> Counter[str]:
    """Pre-tokenised (normalised) word counts of ``texts``, special tokens removed."""
    norm, pre = _normalizer(), _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        counts.update(word for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def train_dataset_tokenizer(texts: Iterable[str], out_dir: str | Path, kind: str = "auto",
                            vocab_size: int = 8192):
    """A tokenizer for a user's dataset: the chat template's strings are always part of its training text,
    and it is checked to encode them without ``<unk>``.

    ``kind``: "word" (one token per word, like the synthetic tokenizer: exact and short, when the text has
    at most ``vocab_size`` distinct words), "bpe" (byte-pair merges of the same normalised words up to
    ``vocab_size`` tokens: rare answer words become pieces instead of ``<unk>``), or "auto" (word when it
    fits, else bpe). The short-answer instruction is one token in the word-level kind (see
    :func:`train_tokenizer`)."""
    from tokenizers import trainers

    from mmoe.data.template import SHORT_ANSWER_SUFFIX

    if kind not in ("auto", "word", "bpe"):
        raise ValueError(f"tokenizer kind must be auto, word or bpe, got {kind!r}")
    texts = [*template_strings(), *texts]
    n_words = len(count_words(texts))
    if kind == "auto":
        kind = "word" if n_words + len(SPECIAL_TOKENS) + 1 <= vocab_size else "bpe"
    if kind == "word":
        tok = train_tokenizer(texts, out_dir, max_vocab=vocab_size, phrases=[SHORT_ANSWER_SUFFIX])
    else:
        bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        bpe.normalizer = _normalizer()
        bpe.pre_tokenizer = _pre_tokenizer()
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
        bpe.train_from_iterator(texts, trainer)
        bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
        tok = _save_tokenizer(bpe, out_dir)
    check_template_tokens(tok, where=f"tokenizer trained into {out_dir}")
    return tok


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tokenizer(path: str | Path):
    """Load a local tokenizer directory with ``AutoTokenizer`` and make it usable by the chat template.

    Guarantees a pad token (falls back to eos, then unk) and that ``<image>`` is a single special token (added if
    missing: callers must then resize the model's embeddings to ``len(tokenizer)``).
    """
    from transformers import AutoTokenizer  # local import: transformers is slow to import

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {p}")
    if not any((p / name).exists() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {p}: expected one of {', '.join(_TOKENIZER_FILES)} "
            "(run data_scripts/make_synthetic.py or point tokenizer_path at a Hugging Face model directory)"
        )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an mmoe export's config.json is not a transformers model config: no warning
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer in {p} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # add_tokens(special_tokens=True) exists with the same meaning in transformers 4.x and 5.x
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer in {p} splits {IMAGE_TOKEN!r} into {len(ids)} tokens; it must be one token"
        )
    return tokenizer


def image_token_id(tokenizer) -> int:
    """Id of ``<image>``; raises if the tokenizer was not prepared by :func:`load_tokenizer`."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ValueError(
            f"tokenizer has no {IMAGE_TOKEN!r} token; load it with mmoe.data.tokenizer.load_tokenizer"
        )
    return int(tid)
