"""The shared tokenizer: loading it, checking a draft speaks it, its stop tokens.

Contract: `load_tokenizer(folder)` is the folder's tokenizer or a one-line
`ModelLoadError`. `check_compatible(target_tok, draft_tok, ...)` raises
`IncompatibleModelsError` unless every token of the smaller vocabulary has
the same id in the larger one and both end sequences with the same token;
otherwise it returns a short description of the match. `check_vocab_sizes`
raises it when a loaded model has fewer token embeddings than the ids the
tokenizer produces (`tokenizer_span`). `stop_token_ids` are
the ids that end a chat reply. Nothing here loads weights.
"""

from __future__ import annotations

from pathlib import Path

from .errors import IncompatibleModelsError, load_error

# transformers is imported inside load_tokenizer: it takes seconds to import.

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise load_error(f"cannot load the tokenizer of {folder}: {type(error).__name__}: {error}") from None


def _first_difference(small: dict[str, int], large: dict[str, int]) -> str:
    for token, index in sorted(small.items(), key=lambda item: item[1]):
        if large.get(token) != index:
            other = large.get(token)
            where = "absent" if other is None else f"id {other}"
            return f"token {token!r} is id {index} in one and {where} in the other"
    return ""


def check_compatible(target_tokenizer, draft_tokenizer, target_name: str, draft_name: str) -> str:
    """Raise IncompatibleModelsError unless the draft speaks the target's vocabulary.

    Every token of the smaller vocabulary must have the same id in the larger
    one, and both must end sequences with the same token. Returns a short
    description of the match.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    sizes = f"{len(target_vocab)} vs {len(draft_vocab)} tokens"
    small, large = sorted((target_vocab, draft_vocab), key=len)
    difference = _first_difference(small, large)
    if difference:
        raise IncompatibleModelsError(
            f"target '{target_name}' and draft '{draft_name}' do not share a tokenizer vocabulary "
            f"({sizes}; {difference}); pick a draft of the target's model family"
        )
    eos = (target_tokenizer.eos_token, draft_tokenizer.eos_token)
    if eos[0] != eos[1]:
        raise IncompatibleModelsError(
            f"target '{target_name}' and draft '{draft_name}' end sequences differently "
            f"(end-of-sequence token {eos[0]!r} vs {eos[1]!r}); pick a draft of the target's model family"
        )
    if len(target_vocab) == len(draft_vocab):
        return f"compatible: same tokenizer vocabulary ({len(target_vocab)} tokens)"
    return f"compatible: the smaller vocabulary is a prefix of the larger ({sizes})"


def tokenizer_span(tokenizer) -> int:
    """How many token ids the tokenizer can produce: one past its highest id, added tokens included."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def check_vocab_sizes(tokenizer, target_vocab: int, draft_vocab: int | None, target_name: str, draft_name: str) -> None:
    """Raise IncompatibleModelsError unless both models (the target alone when draft_vocab is None)
    have a row for every id the tokenizer produces.

    The models' vocabulary sizes (embedding rows) may differ from each other -- padded vocabularies
    are common, and the engine decodes over the smaller one -- but not fall short of the tokenizer:
    a prompt or a reply with a higher id would index past the embedding mid-reply."""
    span = tokenizer_span(tokenizer)
    sizes = f"target '{target_name}' has {target_vocab}"
    if draft_vocab is not None:
        sizes += f", draft '{draft_name}' has {draft_vocab}"
    for role, name, size in (("target", target_name, target_vocab), ("draft", draft_name, draft_vocab)):
        if size is not None and size < span:
            raise IncompatibleModelsError(
                f"the {role} '{name}' has {size} token embeddings, but the tokenizer produces ids up to "
                f"{span - 1} ({sizes}); the model folder's weights and tokenizer do not belong together"
            )


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-sequence id plus the chat end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return sorted(ids)
