"""A word-level tokenizer over the toy world's vocabulary, as a real `PreTrainedTokenizerFast`.

Why word-level: the toy language is a closed template grammar, so one token per word keeps the toy
models tiny and lets a 4-layer IDM emit exact sentences. It saves and loads with
`save_pretrained` / `AutoTokenizer.from_pretrained` like any Hugging Face tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cwm_ray.toyworld.world import COLORS, DIRECTIONS, RELATIONS, SHAPES

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    | {w for rel in RELATIONS.values() for w in rel.split()}
    | {"move", "remove", "add", "make", "put", "the", "a", "an"}
    | {"what", "action", "turns", "first", "image", "into", "second", "?", "answer", ":", "."}
)


def build_word_tokenizer(extra_tokens: list[str] | None = None,
                         named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Specials, the toy words, then `extra_tokens` (e.g. an image placeholder) as special tokens.

    `named` instead gives each extra token the attribute a processor reads (Janus's processor reads
    `tokenizer.image_token`, `boi_token`, `eoi_token`); the vocabulary is the same.
    """
    extra = list(extra_tokens or []) + [t for t in (named or {}).values() if t not in (extra_tokens or [])]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + extra)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = {"extra_special_tokens": named} if named else {"additional_special_tokens": extra or None}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        clean_up_tokenization_spaces=False, **specials,
    )
    if named:  # the unnamed extras as special tokens too (their ids are already in the vocabulary)
        fast.add_tokens([t for t in extra if t not in named.values()], special_tokens=True)
    fast.model_max_length = 512
    return fast
