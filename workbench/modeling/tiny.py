"""A byte-level tokenizer and random models built from configs: complete models with no download.

`tiny-random-<architecture>` names one (`tiny-random-llama` is `recipes/tiny.yaml`'s); the tests
use them too. The tokenizer has one token per byte plus the ChatML special tokens, and a ChatML
chat template, so every data path of the real models works with every architecture.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
)

PREFIX = "tiny-random-"
# `tiny-random-<name>` -> the transformers model_type built. Each trains with every regularizer
# and passes the eval suite (docs/architectures.md); they differ in what the workbench reaches
# into: the head (tied in gemma*, gpt2, opt, cohere, falcon, bloom, starcoder2; soft-capped in
# gemma2; scaled in cohere), fused QKV (phi3, gpt-neox, falcon, bloom, gpt2), GPT-2's transposed
# Conv1D and OPT's MLP on flattened tokens.
ARCHITECTURES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "phi": "phi", "gpt-neox": "gpt_neox",
    "gpt2": "gpt2", "opt": "opt", "falcon": "falcon", "bloom": "bloom", "granite": "granite",
    "cohere": "cohere", "olmo2": "olmo2", "stablelm": "stablelm", "starcoder2": "starcoder2",
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + 3 specials; `<|endoftext|>` is pad, bos and eos, `<|im_end|>` ends turns."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def architecture(name: str) -> str | None:
    """The architecture of a `tiny-random-<architecture>` model name, else None."""
    return name.removeprefix(PREFIX) if name.startswith(PREFIX) else None


def tiny_model(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
               num_attention_heads: int = 4, num_key_value_heads: int = 2,
               intermediate_size: int = 128, seed: int = 0, architecture: str = "llama") -> PreTrainedModel:
    """A randomly initialised causal LM of `architecture` (a key of ARCHITECTURES), fp32; the same
    seed gives the same weights. Each architecture keeps its own default for tied embeddings."""
    if architecture != "llama":
        return _tiny_other(ARCHITECTURES[architecture], vocab_size, hidden_size, num_hidden_layers,
                           num_attention_heads, num_key_value_heads, intermediate_size, seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=0.1)  # wide enough that a frozen head can express a peaked distribution
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _tiny_other(model_type: str, vocab_size: int, hidden_size: int, num_hidden_layers: int,
                num_attention_heads: int, num_key_value_heads: int, intermediate_size: int,
                seed: int) -> PreTrainedModel:
    """`tiny_model` for any other model_type: the config's attribute map turns the Llama names
    (hidden_size, ...) into its own (GPT-2's n_embd, ...); head_dim is pinned to hidden / heads,
    as Gemma's default of 256 would make the tiny model 7x larger; every dropout is 0, as in the
    tiny Llama, so the tuned model at adapter scale 0 scores exactly as the base."""
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, initializer_range=0.1)
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    for key, value in (("head_dim", hidden_size // num_attention_heads), ("ffn_dim", intermediate_size)):
        if hasattr(config, key) and not isinstance(getattr(type(config), key, None), property):  # OPT: ffn_dim
            setattr(config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
