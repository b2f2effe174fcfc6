"""A tiny random Llama folder built by transformers itself, for the import tests and the elastify recipe test."""

from __future__ import annotations

import torch
import transformers

from matryoshka_lm.core import checkpoint as ck

EOT = "<|endoftext|>"


def tiny_llama(folder, ckpt, tie=True, **kw):
    """A random Llama built by transformers itself (9 heads in 3 KV groups like SmolLM2, scaled down)."""
    tok = ck.load_tokenizer(ckpt)
    args = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    args.update(kw)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)
    fast.save_pretrained(str(folder))
    return model.eval()
