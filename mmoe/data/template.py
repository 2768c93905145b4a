"""The project chat template, with exact label masks.

Rendered as plain text, a conversation (human, gpt, human, gpt, ...) is::

    <bos>USER: <image>\\n{q1} ASSISTANT: {a1}<eos>USER: {q2} ASSISTANT: {a2}<eos>

Every piece is tokenised on its own and the ids are concatenated, so the label mask is exact by construction
(no string offsets): labels are ``IGNORE_INDEX`` everywhere except on assistant answer tokens and their ``<eos>``.
``<image>`` is always inserted as its single token id wherever it appears in a human turn.

Short answers: VQA-style questions carry :data:`SHORT_ANSWER_SUFFIX` (LLaVA's wording) both in the synthetic
training conversations and in evaluation prompts, so train and eval prompts match. Captioning turns do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmoe.constants import IGNORE_INDEX, IMAGE_TOKEN
from mmoe.data.tokenizer import image_token_id

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image briefly."  # the captioning instruction used in training and by inference
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = " ASSISTANT:"
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant"})


def _name(sample_id: str | None) -> str:
    return f"sample {sample_id!r}" if sample_id is not None else "conversation"


def _encode_text(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    # The Rust tokenizer itself: the same ids without transformers' per-call Python overhead, as long as the
    # backend holds no state `encode` would reset first (padding or truncation from a tokenizer.json, or a
    # split_special_tokens setting it has not synced yet); the one `encode` call below resets it.
    if (backend is not None and backend.padding is None and backend.truncation is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_human(tokenizer, text: str, sample_id: str | None, turn: int) -> list[int]:
    """``USER: {text} ASSISTANT:`` with every ``<image>`` placed as its own id."""
    if not isinstance(text, str):
        raise TypeError(f"{_name(sample_id)}: turn {turn} value must be a string, got {type(text).__name__}")
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) == 1 and not text.strip():
        raise ValueError(f"{_name(sample_id)}: turn {turn} has an empty question")
    img_id = image_token_id(tokenizer)
    ids = _encode_text(tokenizer, USER_PREFIX)
    for k, piece in enumerate(pieces):
        if k > 0:
            ids.append(img_id)
        if piece.strip():  # whitespace-only glue around <image> (e.g. the "\n") carries no information
            ids += _encode_text(tokenizer, piece)
    return ids + _encode_text(tokenizer, ASSISTANT_PREFIX)


def _encode_answer(tokenizer, text: str, sample_id: str | None, turn: int) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"{_name(sample_id)}: turn {turn} value must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{_name(sample_id)}: turn {turn} has an empty answer")
    if IMAGE_TOKEN in text:
        raise ValueError(f"{_name(sample_id)}: turn {turn} (assistant) contains {IMAGE_TOKEN!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; the template needs one to end answers")
    return _encode_text(tokenizer, text.strip()) + [int(tokenizer.eos_token_id)]


def _bos(tokenizer) -> list[int]:
    return [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []


def _role(turn: Mapping, sample_id: str | None, index: int) -> str:
    role = turn.get("from") if isinstance(turn, Mapping) else None
    if role in HUMAN_ROLES:
        return "human"
    if role in GPT_ROLES:
        return "gpt"
    raise ValueError(
        f"{_name(sample_id)}: turn {index} has role {role!r}; expected one of human/user, gpt/assistant"
    )


def encode_conversation(
    tokenizer, conversations: Sequence[Mapping[str, str]], max_len: int, sample_id: str | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for a whole conversation of alternating human/gpt turns.

    Truncates to ``max_len`` tokens; raises ValueError if that would cut an ``<image>`` token (the image features
    would have nowhere to go) or leave no answer token to learn from.
    """
    if not conversations:
        raise ValueError(f"{_name(sample_id)}: empty conversation")
    if len(conversations) % 2:
        raise ValueError(f"{_name(sample_id)}: {len(conversations)} turns; expected human/gpt pairs")
    input_ids, labels = _bos(tokenizer), [IGNORE_INDEX] * len(_bos(tokenizer))
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        role = _role(turn, sample_id, i)
        if role != expected:
            raise ValueError(
                f"{_name(sample_id)}: turn {i} is from {role!r}, expected {expected!r} (turns alternate)"
            )
        if role == "human":
            ids = _encode_human(tokenizer, turn.get("value"), sample_id, i)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        else:
            ids = _encode_answer(tokenizer, turn.get("value"), sample_id, i)
            input_ids += ids
            labels += ids
    if len(input_ids) > max_len:
        img_id = image_token_id(tokenizer)
        if img_id in input_ids[max_len:]:
            raise ValueError(
                f"{_name(sample_id)}: {len(input_ids)} tokens exceed max_len={max_len} and truncation would cut "
                f"an {IMAGE_TOKEN} token; raise max_len or shorten the conversation"
            )
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(f"{_name(sample_id)}: no answer tokens left within max_len={max_len}")
    return {"input_ids": input_ids, "labels": labels}


def encode_independent_turns(
    tokenizer, conversations: Sequence[Mapping[str, str]], max_len: int, sample_id: str | None = None
) -> dict[str, list[int]] | None:
    """Shared-prefix packing of a one-image conversation: ``<bos>USER: <image>`` (segment 0), then each
    (question, answer) pair as segment k = 1, 2, ...: ``\n{q_k} ASSISTANT: {a_k}<eos>``.

    Why: with ``segment_ids`` the model lets segment k see only the prefix and itself, with positions
    restarting after the prefix, so every question is trained exactly as evaluation asks it
    (``<bos>USER: <image>\n{q} ASSISTANT:``, :func:`build_prompt`): no answer can be read off an earlier
    turn and no question sits at positions evaluation never uses. Whole segments that do not fit in
    ``max_len`` are dropped (never cut). Returns None when the conversation is not one image opening the first
    question (then the caller encodes it as an ordinary conversation).
    """
    if not conversations or len(conversations) % 2:
        return None
    first = conversations[0].get("value") if isinstance(conversations[0], Mapping) else None
    if not isinstance(first, str) or first.count(IMAGE_TOKEN) != 1 or first.split(IMAGE_TOKEN)[0].strip():
        return None
    if any(IMAGE_TOKEN in str(t.get("value", "")) for t in conversations[1:] if isinstance(t, Mapping)):
        return None
    img_id = image_token_id(tokenizer)
    prefix = _bos(tokenizer) + _encode_text(tokenizer, USER_PREFIX) + [img_id]
    input_ids, labels, segments = list(prefix), [IGNORE_INDEX] * len(prefix), [0] * len(prefix)
    for k in range(0, len(conversations), 2):
        q, a = conversations[k], conversations[k + 1]
        for i, (turn, want) in enumerate(((q, "human"), (a, "gpt"))):
            if _role(turn, sample_id, k + i) != want:
                raise ValueError(f"{_name(sample_id)}: turn {k + i} is from {turn.get('from')!r}, expected "
                                 f"{want!r} (turns alternate)")
        text = str(q.get("value")).replace(IMAGE_TOKEN, "").strip()
        if not text:
            raise ValueError(f"{_name(sample_id)}: turn {k} has an empty question")
        question = _encode_text(tokenizer, "\n" + text) + _encode_text(tokenizer, ASSISTANT_PREFIX)
        answer = _encode_answer(tokenizer, a.get("value"), sample_id, k + 1)
        if len(input_ids) + len(question) + len(answer) > max_len:
            break
        seg = k // 2 + 1
        input_ids += question + answer
        labels += [IGNORE_INDEX] * len(question) + answer
        segments += [seg] * (len(question) + len(answer))
    if len(segments) == len(prefix):
        raise ValueError(f"{_name(sample_id)}: no whole question-answer pair fits within max_len={max_len}")
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segments}


def build_prompt(tokenizer, question: str, history: Sequence[tuple[str, str]] | None = None) -> list[int]:
    """Prompt ids for generation: ``<bos>`` + previous (question, answer) turns + ``USER: {question} ASSISTANT:``.

    Equals the prefix of :func:`encode_conversation` for the same turns, so generation sees training prompts.
    """
    ids = _bos(tokenizer)
    for k, (q, a) in enumerate(history or ()):
        ids += _encode_human(tokenizer, q, None, 2 * k) + _encode_answer(tokenizer, a, None, 2 * k + 1)
    return ids + _encode_human(tokenizer, question, None, 2 * len(history or ()))


def with_short_answer(question: str) -> str:
    """Append :data:`SHORT_ANSWER_SUFFIX` unless already present."""
    return question if question.endswith(SHORT_ANSWER_SUFFIX) else question + SHORT_ANSWER_SUFFIX


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids -> answer text: cut at the first ``<eos>``, drop special tokens, strip spaces."""
    ids = [int(i) for i in ids]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
