"""The tokenizer calls inference makes, on the `tokenizers` library alone (no transformers).

An export carries a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``). The pipeline needs only
``encode`` without special tokens, ``decode`` / ``batch_decode``, the special token ids and ``<image>``; this class
gives those from the Rust tokenizer, so `pip install mmoe` users answer questions with torch, tokenizers and
safetensors. `load_inference_tokenizer` prefers transformers' ``AutoTokenizer`` (through
:func:`mmoe.data.tokenizer.load_tokenizer`) when it is installed, so existing behaviour is kept exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from mmoe.constants import IMAGE_TOKEN

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' clean_up_tokenization, applied when tokenizer_config.json asks for it
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerLoadError(ValueError):
    """A tokenizer directory that inference cannot use; the message names the file and the token."""


def _token_text(value) -> str | None:
    """Special tokens are strings or AddedToken dicts ({"content": "<s>", ...}) in tokenizer_config.json."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class InferenceTokenizer:
    """A `tokenizers.Tokenizer` with the Hugging Face tokenizer methods the chat template and pipeline call."""

    is_fast = False  # the chat template then calls `encode`, which is the Rust tokenizer already

    def __init__(self, backend: Tokenizer, config: dict, where: str = "<tokenizer>"):
        backend.no_truncation()  # as transformers' encode(): no padding or truncation from tokenizer.json
        backend.no_padding()
        self.backend = backend
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))
        if self.pad_token is None:  # as load_tokenizer: pad with eos, then unk
            self.pad_token = self.eos_token or self.unk_token
        for name in SPECIAL_NAMES:
            token = getattr(self, name)
            tid = None if token is None else backend.token_to_id(token)
            if token is not None and tid is None:
                raise TokenizerLoadError(f"{where}: {name} {token!r} is not in the vocabulary")
            setattr(self, f"{name}_id", tid)
        if backend.token_to_id(IMAGE_TOKEN) is None:
            raise TokenizerLoadError(f"{where}: no {IMAGE_TOKEN!r} token (an mmoe export always has one)")

    @classmethod
    def from_dir(cls, path: str | Path) -> "InferenceTokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerLoadError(f"{path}: no tokenizer.json (needed without transformers)")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        special_map = path / "special_tokens_map.json"
        if special_map.is_file():  # older exports keep the special tokens here only
            for k, v in json.loads(special_map.read_text()).items():
                config.setdefault(k, v)
        return cls(Tokenizer.from_file(str(file)), config, str(path))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        tid = self.backend.token_to_id(token)
        return self.unk_token_id if tid is None else tid

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences: Sequence[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]


def load_inference_tokenizer(path: str | Path, backend: str = "auto"):
    """The export's tokenizer: transformers' when installed (backend 'auto'), else `InferenceTokenizer`."""
    if backend not in ("auto", "transformers", "tokenizers"):
        raise ValueError(f"tokenizer backend must be auto, transformers or tokenizers, got {backend!r}")
    if backend != "tokenizers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            if backend == "transformers":
                raise
        else:
            from mmoe.data.tokenizer import load_tokenizer

            return load_tokenizer(path)
    return InferenceTokenizer.from_dir(path)


__all__ = ["InferenceTokenizer", "TokenizerLoadError", "load_inference_tokenizer"]
