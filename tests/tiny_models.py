"""Tiny random causal LMs of every covered architecture, with a real trained BPE tokenizer.

Built from configs (no download), saved to a folder, so the real loading code is exercised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

DATA = Path(__file__).parent / "data"
VOCAB = 512
HIDDEN = 32
LAYERS = 6

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")


def training_text() -> str:
    path = DATA / "shakespeare_sample.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    from pydoc_data.topics import topics  # stdlib prose, always available

    return "\n\n".join(topics.values())


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on Shakespeare: a real tokenizer, small enough for tiny models."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, num_layers: int = LAYERS, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    if arch == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=num_layers, n_head=4, n_positions=256,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    elif arch == "gpt_neox":
        kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                  pad_token_id=1, tie_word_embeddings=False)
    elif arch == "opt":
        kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    elif arch in ("qwen3", "gemma"):
        kw = dict(common, head_dim=8)
    elif arch == "gemma2":
        kw = dict(common, head_dim=8, sliding_window=8,
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                               for i in range(num_layers)])
    elif arch == "mistral":
        kw = dict(common, sliding_window=None)
    else:
        kw = common
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_tiny_model(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0,
                     num_layers: int = LAYERS) -> Path:
    """Save a tiny random model of ``arch`` (with the shared tokenizer) to ``out_dir``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers), dtype=torch.float32)
    # Random init gives near-identical layers (tiny residual updates); scale up so metrics differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
            elif p.dim() == 1 and "weight" in name:  # norms: non-uniform gains, so a norm changes cosines
                p.add_(0.5 * torch.randn_like(p))
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        (out_dir / f.name).write_bytes(f.read_bytes())
    (out_dir / "layerlens_test.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir


def param_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes: a model "bit-identical" before and after has one hash."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
