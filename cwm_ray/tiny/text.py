"""A tiny randomly initialised BERT (BertModel + its WordPiece tokenizer over the toy world's words), saved like a
hub checkpoint: BERTScore's encoder for tests, loaded by path through bert-score as `roberta-large` is on a cluster.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, BertTokenizer

from cwm_ray.toyworld.tokenizer import WORDS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(directory: str, *, seed: int = 0) -> str:
    """Save the model and tokenizer to `directory` and return it.

    `initializer_range` 0.5 rather than BERT's 0.02: at the usual scale a random 2-layer encoder maps every word to
    nearly the same feature, and BERTScore could not tell one action from another. `model_max_length` is set as
    released checkpoints set it (bert-score truncates sentences to it).
    """
    words = SPECIALS + [w for w in WORDS if w not in SPECIALS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=64)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
