"""Writes the tiny Hugging Face checkpoints `tests/test_hf.py` reads.

Each folder is a random model built and saved by transformers itself
(config.json + safetensors, as `save_pretrained` writes them), with
`reference.npz`: transformers' float32 logits on fixed tokens and its greedy
generation. Run it with transformers and torch installed (on this machine
`pip install torch==2.13.0 transformers`: a CPU build), from the repo root:

    python tests/hf_fixtures/make_fixtures.py

Weights are drawn at a larger scale than transformers' initializer (std 0.02
gives near-uniform logits and routing), and the norm scales and DeepSeek-V3's
`e_score_correction_bias` are drawn too, so that a mapping that drops or
transposes any tensor changes the logits.
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))
PROMPT_LENGTH, NEW_TOKENS = 4, 16

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.25)

# name -> (config class, model class, config keywords, how it is saved)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(intermediate_size=48, num_key_value_heads=2, rms_norm_eps=1e-5,
                   tie_word_embeddings=False), "single"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(intermediate_size=48, num_key_value_heads=2, head_dim=16,
                   tie_word_embeddings=True, rope_theta=1e6), "single"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=16, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2, rms_norm_eps=1e-5), "single"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2,
                       head_dim=16, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True), "sharded"),
    # The fused expert tensors of transformers 5 as they are in memory
    # (mlp.experts.gate_up_proj [E, 2H, D], down_proj [E, D, H]) written as is.
    "qwen3_moe_fused": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        dict(intermediate_size=48, moe_intermediate_size=16,
                             num_key_value_heads=2, head_dim=16, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=False), "fused"),
    # MLA with a compressed query, YaRN (mscale != mscale_all_dim), interleaved
    # RoPE, a dense first layer of another width, group-limited sigmoid
    # routing with a non-zero e_score_correction_bias, a shared expert.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                         first_k_dense_replace=1, num_key_value_heads=4, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=12, rope_interleave=True,
                         rope_scaling={"type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 16,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                       "mscale_all_dim": 0.8}), "single"),
    # DeepSeek-V2-Lite's shape: a full query projection, plain RoPE, no groups.
    "deepseek_v3_full_query": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                               dict(num_hidden_layers=2, intermediate_size=48,
                                    moe_intermediate_size=16, first_k_dense_replace=0,
                                    num_key_value_heads=4, n_routed_experts=8,
                                    n_shared_experts=2, num_experts_per_tok=2, n_group=1,
                                    topk_group=1, routed_scaling_factor=1.0,
                                    norm_topk_prob=False, q_lora_rank=None,
                                    kv_lora_rank=16, qk_rope_head_dim=8,
                                    qk_nope_head_dim=8, v_head_dim=8,
                                    rope_interleave=False), "single"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_key_value_heads=4, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5),
              "single"),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("norm.weight"):
        tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
      elif "e_score_correction_bias" in name:
        tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
      elif tensor.is_floating_point():
        fan_in = tensor.shape[-1] if tensor.ndim > 1 else 1
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)


def reference(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
  ids = torch.tensor(tokens)
  with torch.no_grad():
    logits = model(ids).logits.float().numpy()
    generated = model.generate(ids[:, :PROMPT_LENGTH], max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0, eos_token_id=None).numpy()
  return {"tokens": tokens, "logits": logits, "generated": generated,
          "prompt_length": np.int32(PROMPT_LENGTH)}


SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), "shared",
                           "data", "tiny_shakespeare", "input.txt")


def write_tokenizer(folder: str, vocab_size: int) -> None:
  """A character-level BPE tokenizer of `vocab_size` ids (eos included)
  trained on tiny_shakespeare, saved as a checkpoint's tokenizer files."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
  tokenizer.decoder = decoders.Fuse()
  with open(SHAKESPEARE, encoding="utf-8") as f:
    text = f.read()[:200_000]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                show_progress=False)
  tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
  assert tokenizer.get_vocab_size() <= vocab_size
  tokenizer.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def main() -> None:
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  for seed, (name, (config_cls, model_cls, kwargs, layout)) in enumerate(FAMILIES.items()):
    folder = os.path.join(HERE, name)
    shutil.rmtree(folder, ignore_errors=True)
    config = getattr(transformers, config_cls)(**{"num_hidden_layers": 2, **COMMON, **kwargs})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    if layout == "fused":
      os.makedirs(folder)
      config.save_pretrained(folder)
      state = {k: v.contiguous() for k, v in model.state_dict().items()}
      if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
      save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
      reloaded = getattr(transformers, model_cls).from_pretrained(folder).eval()
      with torch.no_grad():
        ids = torch.tensor(TOKENS)
        assert torch.equal(reloaded(ids).logits, model(ids).logits), name
    else:
      model.save_pretrained(folder, max_shard_size="40KB" if layout == "sharded" else "50GB")
    np.savez(os.path.join(folder, "reference.npz"), **reference(model, TOKENS))
    if name == "qwen3_moe":  # one fixture carries its own tokenizer
      write_tokenizer(folder, COMMON["vocab_size"])
    if os.path.exists(os.path.join(folder, "generation_config.json")):
      os.remove(os.path.join(folder, "generation_config.json"))
    sizes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{name}: {sorted(os.listdir(folder))}, {sizes / 1e3:.0f} kB")
  with open(os.path.join(HERE, "versions.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__}, f)


if __name__ == "__main__":
  main()
