"""A byte-level tokenizer and a random Llama built from a config: a complete model with no download.

Used by `recipes/tiny.yaml` and by the tests. The tokenizer has one token per byte plus the
ChatML special tokens, and a ChatML chat template, so every data path of the real models works.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def tiny_model(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
               num_attention_heads: int = 4, num_key_value_heads: int = 2,
               intermediate_size: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama (fp32); the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=0.1)  # wide enough that a frozen head can express a peaked distribution
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
