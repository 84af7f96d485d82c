"""Offline text side for the tiny presets: a word-level tokenizer built locally with `tokenizers`
and a tiny (UM)T5 encoder built from config. Real models use their own tokenizer/encoder."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast


def build_tokenizer(words: list[str], max_len: int = 16) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len, padding_side="right")


def build_text_encoder(family: str, vocab_size: int, d_model: int = 32, seed: int = 0) -> torch.nn.Module:
    """Frozen tiny encoder: UMT5 for Wan, T5 for CogVideoX (the classes their pipelines use)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    if family == "wan":
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()
