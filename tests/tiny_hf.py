"""Tiny random transformers models and a word-level tokenizer, saved to a folder, for tests.

transformers is imported inside the functions: importing this module stays cheap, and tests
that use it call ``pytest.importorskip("transformers")`` first.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "hello",
    "world",
    "free",
    "win",
    "prize",
    "call",
    "now",
    "meet",
    "me",
    "at",
    "home",
    "the",
    "a",
    "is",
    "good",
    "bad",
    "ok",
    "yes",
    "no",
    "what",
    "time",
    "answer",
    "question",
]


# The tiny encoders' shape (BERT and RoBERTa alike): 2 layers of width 32, no dropout.
ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tokenizer(kind: str = "bert"):
    """A word-level fast tokenizer over WORDS; BERT-style ([CLS] .. [SEP]) or Llama-style (<s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def bert(folder: Path | None = None, vocab_size: int = 64, seed: int = 0):
    """A 2-layer BERT encoder (hidden 32); saved with its tokenizer when ``folder`` is given."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **ENCODER)
    model = BertModel(config)
    if folder is not None:
        model.save_pretrained(str(folder))
        tokenizer("bert").save_pretrained(str(folder))
    return model


def roberta(
    folder: Path | None = None, kind: str = "roberta", pad_token_id: int = 1, task: bool = False, seed: int = 0
):
    """A 2-layer RoBERTa (``kind`` "xlm-roberta": XLM-R) body (hidden 32), returned in eval mode;
    saved when ``folder`` is given: the body, or with ``task`` its sequence classifier's checkpoint
    (the body under 'roberta.', a classifier beside it)."""
    import transformers

    name = "XLMRoberta" if kind == "xlm-roberta" else "Roberta"
    config = getattr(transformers, f"{name}Config")(
        vocab_size=64, max_position_embeddings=40, pad_token_id=pad_token_id, **ENCODER
    )
    torch.manual_seed(seed)
    body = getattr(transformers, f"{name}Model")(config)
    if folder is not None and task:
        model = getattr(transformers, f"{name}ForSequenceClassification")(config)
        model.roberta.load_state_dict(body.state_dict(), strict=False)  # its body has no pooler
        model.save_pretrained(str(folder))
    elif folder is not None:
        body.save_pretrained(str(folder))
    return body.eval()


def llama(folder: Path | None = None, vocab_size: int = 64, seed: int = 0):
    """A 2-layer Llama causal LM (hidden 32, tied embeddings); saved when ``folder`` is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlamaForCausalLM(config)
    if folder is not None:
        model.save_pretrained(str(folder))
        tokenizer("llama").save_pretrained(str(folder))
    return model
