"""Tiny Hugging Face causal LMs and a tokenizer, built offline in code (no model hub).

Used by the conformance kit, the plugins' tests and the demo. A model directory holds
``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files, so
vLLM, SGLang and ``transformers`` all load it from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ARITHMETIC_SYMBOLS = [str(d) for d in range(10)] + ["+", "=", " ", "-", "*", "?", "Q", "A", ":"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def build_tokenizer(directory: str | Path, symbols: list[str] | None = None):
    """A character-level tokenizer (WordLevel over single characters), saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + (symbols or ARITHMETIC_SYMBOLS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def model_config(
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 32,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    init_std: float = 0.02,
):
    """The transformers config of a tiny ``arch`` ("qwen2" or "llama") model with this
    project's tokenizer ids, float32."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=init_std,
        dtype="float32",
        rms_norm_eps=1e-6,
    )
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use 'qwen2' or 'llama'")


def build_tiny_model(
    directory: str | Path, *, seed: int = 0, init_std: float = 0.02, **shape
) -> Path:
    """Write a randomly initialised tiny model to ``directory``; ``shape`` takes the keywords of
    ``model_config`` (``arch``, ``hidden_size``, ``num_layers``, ...).

    float32 weights; the tokenizer of ``build_tokenizer`` (its vocabulary fits in 32 ids).
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model_config(init_std=init_std, **shape)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init alone gives near-uniform outputs; a larger spread makes adapters and bugs visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std * 5)
    save_model_directory(model, directory)
    return directory


def save_model_directory(model, directory: Path) -> None:
    """``model`` as safetensors, with this project's tokenizer and generation ids."""
    model.save_pretrained(str(directory), safe_serialization=True)
    build_tokenizer(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}) + "\n"
    )
