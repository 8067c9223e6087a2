"""Tiny, offline text fixtures: a WordPiece tokenizer, randomly initialised Hugging Face BERT folders and a
labelled text set whose label is decided by which words occur (learnable in a few epochs)."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POS = ["good", "great", "fine", "happy", "love", "nice", "best", "fun"]
NEG = ["bad", "awful", "sad", "hate", "poor", "worst", "dull", "ugly"]
FILLER = ["the", "a", "movie", "book", "was", "is", "it", "and", "this", "day", "very", "so", "plot", "food"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: Path) -> Path:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + POS + NEG + FILLER + ["##s", "##ly"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=64).save_pretrained(str(folder))
    return folder


def write_bert_folder(folder: Path, layers: int = 4, hidden: int = 32, heads: int = 2, num_labels: int = 2,
                      seed: int = 0, safetensors: bool = True) -> Path:
    """A randomly initialised BERT classifier saved like a downloaded model (config, weights, tokenizer)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    write_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(SPECIAL + POS + NEG + FILLER) + 2, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(str(folder))
    if not safetensors:  # an old-style checkpoint: pickle weights only
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(POS if label else NEG, k=rng.randint(1, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


def write_text_data(path: Path, n: int = 240, seed: int = 0, text_col: str = "text", label_col: str = "label") -> Path:
    rows = sentences(n, seed)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text_col: t, label_col: y}) + "\n" for t, y in rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([text_col, label_col])
            w.writerows(rows)
    return path


LM_WORDS = ["the", "king", "queen", "said", "unto", "them", "and", "went", "to", "city", "land", "of", "people", "lord",
            "came", "house", "day", "night", "a", "man", "woman", "river", "gold", "bread", "."]


def write_word_tokenizer(folder: Path, shuffle: int | None = None, extra: int = 0) -> Path:
    """A word-level tokenizer with an end-of-text token, saved as a Hugging Face folder (as a causal LM has);
    ``shuffle`` (a seed) numbers the words in another order and ``extra`` puts that many unused words first (so the
    corpus words get ids past the plain vocabulary): other tokenizers over the same words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = list(LM_WORDS)
    if shuffle is not None:
        random.Random(shuffle).shuffle(words)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + [f"unused{i}" for i in range(extra)] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>").save_pretrained(str(folder))
    return folder


def write_llama_folder(folder: Path, layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0,
                       shuffle_vocab: int | None = None, extra_words: int = 0) -> Path:
    """A randomly initialised Llama causal LM saved like a downloaded model (config, safetensors, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_word_tokenizer(folder, shuffle_vocab, extra_words)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(LM_WORDS) + 2 + extra_words, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads // 2, intermediate_size=2 * hidden, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=1, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def write_corpus(path: Path, docs: int = 12, sentences: int = 30, seed: int = 0) -> Path:
    """A .jsonl corpus: one document per line, sentences from a small grammar (a pattern a model can learn)."""
    rng = random.Random(seed)
    subj, verb, place = ["the king", "the queen", "a man", "a woman", "the people"], ["went to", "came to"], \
        ["the city", "the land", "the house", "the river"]
    lines = []
    for d in range(docs):
        text = " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(place)} ." for _ in range(sentences))
        lines.append(json.dumps({"book": f"book{d}", "text": text}))
    path.write_text("\n".join(lines) + "\n")
    return path
