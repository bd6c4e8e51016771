"""Tiny random checkpoints saved to disk, built from configs (no hub needed).

Weights are redrawn with a larger spread than transformers' init (std 0.02 gives
near-uniform probabilities, which would hide most bugs).
"""
from __future__ import annotations

import os

import torch

WORDS = ("the cat dog sat on a mat and was there who what where when why how query document "
         "red blue green fast slow big small good bad yes no very not is are be to of in it").split()


def write_wordpiece_tokenizer(path, cls="BertTokenizerFast"):
    """A WordPiece tokenizer (BERT/ERNIE style) with a small vocabulary."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)]
    vocab += ["##" + chr(c) for c in range(97, 123)] + [str(d) for d in range(10)] + [".", ",", "?", "!"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    tok = getattr(transformers, cls)(os.path.join(path, "vocab.txt"))
    tok.save_pretrained(path)
    return tok


def write_bpe_tokenizer(path, kind="roberta"):
    """A byte-level BPE tokenizer trained on a few sentences.

    kind "roberta": <s> A </s></s> B </s> (RoBERTa / XLM-R style specials);
    kind "decoder": no added specials, pad = eos = <|endoftext|> (Qwen/Llama style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta" else ["<|endoftext|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    os.makedirs(path, exist_ok=True)
    if kind == "roberta":
        tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")),
                                                         ("<s>", tk.token_to_id("<s>")))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                      cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                      model_input_names=["input_ids", "attention_mask"])
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                      model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(path)
    return tok


def randomize(model, std=0.3, seed=0, norm_center=1.0):
    """Redraw every floating parameter and buffer-free weight from N(0, std); norm weights
    from N(norm_center, 0.1) (0 for models that scale by 1 + weight, as Gemma does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or name.endswith("norm.weight"):
                p.copy_(norm_center + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def save_tiny(path, config, seed=0, std=0.3, tokenizer="wordpiece", norm_center=1.0):
    """Build AutoModelForSequenceClassification from ``config``, randomise it, save it
    and a tokenizer to ``path``. Returns (model in eval mode, tokenizer)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    randomize(model, std, seed, norm_center).eval()
    model.save_pretrained(path)
    if tokenizer == "wordpiece":
        tok = write_wordpiece_tokenizer(path)
    elif tokenizer in ("roberta", "decoder"):
        tok = write_bpe_tokenizer(path, tokenizer)
    else:
        tok = None
    return model, tok
