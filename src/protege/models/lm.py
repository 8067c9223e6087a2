"""Causal language models: Hugging Face folders (Llama, GPT-2, ...), a small Llama from scratch, and a GGUF
converter, all behind one interface: ids (B, L) int64 -> next-token logits (B, L, V)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ModelError
from ..logs import quiet_transformers
from .text import check_hf_folder


class CausalLM(nn.Module):
    """A Hugging Face causal LM: ``forward(ids)`` gives logits at every position; ``generate`` samples continuations."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, sample: bool = True, temperature: float = 1.0) -> torch.Tensor:
        """prompt (B, P) -> (B, P + new_tokens): ancestral sampling at ``temperature`` (or greedy), with the KV cache."""
        kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, pad_token_id=self.config.eos_token_id, **kw)


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def causal_lm(folder: str, pretrained: bool = True, allow_pickle: bool = False, **overrides: Any) -> CausalLM:
    """A causal LM from a local folder; ``overrides`` change the config (a smaller student: num_hidden_layers, ...)."""
    check_hf_folder(folder, need_weights=pretrained, allow_pickle=allow_pickle)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, **overrides)
    except (ValueError, OSError, TypeError, json.JSONDecodeError) as e:
        raise ModelError(f"model folder '{folder}': config.json cannot be read ({str(e).splitlines()[0][:160]}); check it "
                         f"and the model kwargs {sorted(overrides)}") from None
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if pretrained:
                model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                             use_safetensors=not allow_pickle or None)
            else:
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, OSError, KeyError) as e:
            raise ModelError(f"model folder '{folder}' cannot be loaded as a causal LM ({str(e).splitlines()[0][:160]}); "
                             f"use a decoder model folder (Llama, GPT-2, ...)") from None
    return CausalLM(model.float())


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def small_llama(vocab_size: int, max_length: int = 512, hidden: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: Optional[int] = None, intermediate: Optional[int] = None) -> CausalLM:
    """A Llama-architecture decoder with random weights (Touvron et al. 2023), for students from scratch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 4 * hidden,
                      max_position_embeddings=max(max_length, 8), tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return CausalLM(LlamaForCausalLM(cfg))


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def convert_gguf(src: str | Path, out: str | Path) -> Path:
    """Dequantize a GGUF checkpoint (llama.cpp format) once into a safetensors model folder with its tokenizer.

    ``src`` is the .gguf file. Needs the `gguf` package. Loading the folder afterwards takes a fraction of a second.
    """
    src, out = Path(src), Path(out)
    if src.suffix != ".gguf":
        raise ModelError(f"'{src}' is not a .gguf file; give the path to the GGUF checkpoint")
    if not src.is_file():
        raise ModelError(f"GGUF file '{src}' not found; check the path")
    if (out / "config.json").is_file():
        raise ModelError(f"'{out}' already holds a model; choose an empty folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except ImportError as e:
            raise ModelError(f"reading GGUF needs the `gguf` package ({e}); pip install gguf") from None
    # the loaded weights are already dequantized fp32; a fresh model without the GGUF quantization tag can be saved
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out
