"""Weight memory of the hub agent model (Qwen2-VL-2B-Instruct) in bf16 and in 4-bit NF4, from its config.

How: the model is instantiated from its configuration on PyTorch's ``meta`` device (shapes only, no
weights, nothing downloaded) with transformers' ``Qwen2VLForConditionalGeneration``; parameters are
counted per kind and multiplied by bytes per parameter:

* bf16: 2 bytes for every parameter.
* 4-bit NF4 (bitsandbytes through transformers' ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_use_double_quant=True)``): the weights of ``nn.Linear`` layers take 0.5 byte per
  parameter plus the blockwise quantisation constants (block 64; double quantisation stores them
  as 8-bit with one fp32 constant per 256 blocks: 1/64 + 4/(64*256) bytes per parameter); the
  output head ``lm_head`` (tied to the embedding here) and everything that is not an ``nn.Linear``
  (embeddings, norms, the vision patch Conv3d, biases) stay in bf16 (transformers' bitsandbytes
  integration keeps the output embedding and non-Linear modules unquantised).

Activations, the KV cache and the CUDA context come on top and depend on the prompt; the script
adds the KV cache of one prompt of ``--tokens`` tokens (bf16, 2 x layers x kv_heads x head_dim).

The configuration values are those of ``Qwen/Qwen2-VL-2B-Instruct``'s ``config.json`` (text model:
Qwen2-1.5B dimensions; vision tower: 32-block ViT, width 1280). Run: ``python bench/qwen2_vl_memory.py``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

QWEN2_VL_2B = dict(
    text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
    tie_word_embeddings=True,
)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit absmax per 64-block + fp32 per 256 blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length for the KV-cache figure")
    args = ap.parse_args()
    config = Qwen2VLConfig(**QWEN2_VL_2B)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    seen: set[int] = set()
    linear = other = 0
    parts = {"vision": 0, "text": 0}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied lm_head / embedding counted once
                continue
            seen.add(id(p))
            n = p.numel()
            parts["vision" if ".visual." in f".{name}." else "text"] += n
            if isinstance(module, torch.nn.Linear) and pname == "weight" and not name.endswith("lm_head"):
                linear += n
            else:
                other += n
    total = linear + other
    gib = 1024 ** 3
    bf16 = 2 * total
    nf4 = NF4_BYTES * linear + 2 * other
    tc = config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2 * args.tokens  # K and V, 2 bytes
    print(f"parameters: {total / 1e9:.3f} B (vision tower {parts['vision'] / 1e9:.3f} B, language model "
          f"{parts['text'] / 1e9:.3f} B); nn.Linear weights {linear / 1e9:.3f} B, other {other / 1e9:.3f} B")
    print(f"weights bf16: {bf16 / gib:.2f} GiB")
    print(f"weights 4-bit NF4 (Linear) + bf16 (rest): {nf4 / gib:.2f} GiB  (ratio vs bf16: {nf4 / bf16:.2f})")
    print(f"KV cache for {args.tokens} tokens (bf16): {kv / gib:.3f} GiB")


if __name__ == "__main__":
    main()
