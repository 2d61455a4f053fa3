"""Offline tokenizer training: a byte-level BPE for models built here (tiny test models, world defaults).

Real checkpoints bring their own tokenizer; this exists because nothing can be downloaded on these
machines, so the project's own models need a tokenizer trained from text they generate.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from attrib.backbones.spec import IMAGE_PLACEHOLDER

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_PLACEHOLDER)
_WHOLE_WORD_REPEATS = 64  # enough occurrences that BPE merges each whole word before anything rarer


def train_bpe_tokenizer(
    lines: Iterable[str],
    vocab_size: int,
    whole_words: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``lines``; BOS is prepended on encode; ``<image>`` is a special token.

    Every word in ``whole_words`` must come out as one token after a space (" red"), so that each
    answer of the synthetic world is a single token; a vocabulary too small for that raises.
    Deterministic: the same lines and size give the same vocabulary.
    """
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_with_whole_words(lines, whole_words), trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=[IMAGE_PLACEHOLDER],
    )
    split = [w for w in whole_words if len(tokenizer(" " + w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise ValueError(f"vocab_size={vocab_size} is too small: {len(split)} whole words split, e.g. {split[:5]}")
    return tokenizer


def _with_whole_words(lines: Iterable[str], words: Sequence[str]) -> Iterator[str]:
    yield from lines
    for _ in range(_WHOLE_WORD_REPEATS):
        yield " " + " ".join(words)
