"""Tiny Hugging Face causal language models for the LanguageModel tests.

Each is built from a config with random weights and a BPE tokenizer trained
on a few sentences, saved with ``save_pretrained`` and loaded by path, so
the real ``from_pretrained`` path runs, without any download. The four
families are the ones nnsight's tutorials use: GPT-2, GPT-J, Llama and
GPT-NeoX (Pythia).

The tests run under transformers 4.x and 5.x (``./scripts/test.sh`` runs
them in both environments); ``TRANSFORMERS_MAJOR`` says which, and
``BLOCK_RETURNS_TUPLE`` what each family's decoder block returns there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# GPT-2's block (and GPT-NeoX's) returns a tuple under 4.x, a tensor under 5.x.
BLOCKS_RETURN_TUPLES = TRANSFORMERS_MAJOR < 5
# What a decoder block returns, per family, in this transformers: a tuple
# whose first item is the hidden state, or the hidden state itself.
BLOCK_RETURNS_TUPLE = {"gpt2": BLOCKS_RETURN_TUPLES, "gptj": True, "llama": False, "neox": BLOCKS_RETURN_TUPLES}

CORPUS = [
    "Madison Square Garden is located in the city of New York",
    "The Eiffel Tower is in the city of Paris",
    "The Colosseum is in the city of Rome",
]
WIDTH = 32


def hidden(block_output: Any) -> torch.Tensor:
    """A decoder block's hidden state: ``output[0]`` when the block returns a
    tuple (see BLOCK_RETURNS_TUPLE), else the output itself."""
    if isinstance(block_output, tuple):
        value: torch.Tensor = block_output[0]
        return value
    assert isinstance(block_output, torch.Tensor), type(block_output)
    return block_output


def tokenizer() -> Any:
    """A byte-level BPE trained on CORPUS, with pad/eos/unk tokens (ids 0, 1, 2).

    ``model_input_names`` is set as GPT-2's own tokenizer sets it: the generic
    fast tokenizer of transformers 4.x would also return ``token_type_ids``,
    which GPT-2 embeds (with the token embedding) and so changes the logits.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    return transformers.PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated in transformers
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


_SPECIAL = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}

# Per family: the model class and its config (the config classes' keyword
# arguments differ between transformers versions; these work in both).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"n_layer": 2, "n_embd": WIDTH, "n_head": 4, "n_positions": 64}),
    "gptj": ("GPTJForCausalLM", "GPTJConfig",
             {"n_layer": 2, "n_embd": WIDTH, "n_head": 4, "rotary_dim": 4, "n_positions": 64}),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              {"num_hidden_layers": 2, "hidden_size": WIDTH, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64}),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
             {"num_hidden_layers": 2, "hidden_size": WIDTH, "intermediate_size": 64, "num_attention_heads": 4,
              "rotary_pct": 0.5, "max_position_embeddings": 64}),
}


def build(family: str, vocab: int) -> Any:
    """A tiny ``family`` model with random weights."""
    model_class, config_class, sizes = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=vocab, **sizes, **_SPECIAL)
    return getattr(transformers, model_class)(config)


# Per family: the path of its decoder blocks, of its final norm and of its
# unembedding, and the renames that give it GPT-2's names
# (``model.transformer.h[i]``, ``model.transformer.ln_f``, ``model.lm_head``).
BLOCKS = {"gpt2": "transformer.h", "gptj": "transformer.h", "llama": "model.layers", "neox": "gpt_neox.layers"}
FINAL_NORM = {
    "gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "llama": "model.norm", "neox": "gpt_neox.final_layer_norm"
}
UNEMBED = {"gpt2": "lm_head", "gptj": "lm_head", "llama": "lm_head", "neox": "embed_out"}
AS_GPT2: dict[str, dict[str, str]] = {
    "gpt2": {},
    "gptj": {},
    "llama": {"model": "transformer", "layers": "h", "norm": "ln_f"},
    "neox": {"gpt_neox": "transformer", "layers": "h", "final_layer_norm": "ln_f", "embed_out": "lm_head"},
}


def save(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny ``family`` model and the tokenizer into ``folder``."""
    torch.manual_seed(seed)
    tok = tokenizer()
    model = build(family, len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def plain(folder: Path) -> Any:
    """The saved model, loaded with plain transformers (eval mode)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    torch.nn.Module.eval(model)
    return model


def encode(tok: Any, *texts: str) -> Any:
    """Left-padded ids and attention mask, as LanguageModel makes them."""
    return tok(list(texts), return_tensors="pt", padding=True, padding_side="left")


def greedy(model: Any, encoding: Any, steps: int, **kwargs: Any) -> torch.Tensor:
    """Plain transformers greedy generation."""
    out: torch.Tensor = model.generate(
        **encoding, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs
    )
    return out


def plain_steps(model: Any, path: str, encoding: Any, steps: int) -> list[Any]:
    """The output of module ``path`` at each step of a plain greedy generation."""
    seen: list[Any] = []

    def record(module: Any, inputs: Any, output: Any) -> None:
        seen.append(hidden(output).detach().clone())

    handle = model.get_submodule(path).register_forward_hook(record)
    try:
        greedy(model, encoding, steps)
    finally:
        handle.remove()
    return seen
