"""Logit parity of moejax.hf with transformers, per family (README table).

    python -m experiments.hf_parity [--out=experiments/results/hf]

For each checkpoint in tests/hf_fixtures (tiny random models transformers
built; `tests/hf_fixtures/make_fixtures.py`): the largest |logit difference|
of `moejax.hf.from_pretrained` against transformers' float32 logits stored
with the fixture, whether greedy generation gives transformers' 16 tokens,
and, where transformers and torch are installed, the largest difference of
transformers' own logits on the folder `save_pretrained` wrote. Prints and
writes `parity.json` and `parity.md`.
"""

import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import hf
from moejax.generate import SamplingOptions, generate_tokens

_OUT = flags.DEFINE_string("out", "experiments/results/hf", "Folder of parity.json/.md.")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "hf_fixtures")

# What each fixture exercises (its config.json, in words).
FEATURES = {
    "llama": "dense, GQA 4/2, untied, eps 1e-5",
    "qwen3": "dense, GQA, qk-norm per head, head_dim 16 != D/N, tied",
    "mixtral": "MoE 4 x top-2 (renormalized), GQA, RoPE 1e6",
    "qwen3_moe": "MoE 8 x top-2 (norm_topk_prob), qk-norm per head, GQA; 6 shards + index",
    "qwen3_moe_fused": "as qwen3_moe, norm_topk_prob off; transformers 5's fused expert tensors",
    "olmoe": "MoE 8 x top-2 (not renormalized), qk-norm over the projection",
    "deepseek_v3": "MLA (q and kv latents), YaRN x4 (mscale != mscale_all_dim), interleaved "
                   "RoPE, 1 dense layer of 48, sigmoid top-2 of 8 in 2 of 4 groups, "
                   "e_score_correction_bias, 1 shared expert, scaling 2.5",
    "deepseek_v3_full_query": "MLA with a full query, plain RoPE, 2 shared experts, "
                              "not renormalized",
}


def _transformers_logits(folder: str, tokens: np.ndarray):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def measure(name: str) -> dict:
  folder = os.path.join(FIXTURES, name)
  reference = np.load(os.path.join(folder, "reference.npz"))
  with open(os.path.join(folder, "config.json")) as f:
    model_type = json.load(f)["model_type"]
  model, config = hf.from_pretrained(folder)
  logits, _ = model(jnp.asarray(reference["tokens"], jnp.int32))
  prompt = int(reference["prompt_length"])
  generated = reference["generated"]
  out = generate_tokens(model, [list(row[:prompt]) for row in generated],
                        SamplingOptions(max_new_tokens=generated.shape[1] - prompt,
                                        temperature=0.0))
  record = {"fixture": name, "model_type": model_type, "features": FEATURES[name],
            "import_max_abs_logit_diff": float(np.abs(np.asarray(logits)
                                                      - reference["logits"]).max()),
            "greedy_tokens_equal": out == [list(row[prompt:]) for row in generated],
            "greedy_tokens": int(generated.shape[1] - prompt)}
  with tempfile.TemporaryDirectory() as tmp:
    exported = os.path.join(tmp, "out")
    hf.save_pretrained(model, config, exported)
    theirs = _transformers_logits(exported, reference["tokens"])
  record["export_transformers_max_abs_logit_diff"] = (
      None if theirs is None else float(np.abs(theirs - reference["logits"]).max()))
  return record


def table(records: list[dict]) -> str:
  rows = ["| family (`model_type`) | what the checkpoint has | import: max \\|Δ logit\\| | "
          "greedy 16 tokens | export → transformers: max \\|Δ logit\\| |",
          "|---|---|---:|---|---:|"]
  for r in records:
    theirs = r["export_transformers_max_abs_logit_diff"]
    rows.append(f"| {r['model_type']} | {r['features']} | "
                f"{r['import_max_abs_logit_diff']:.1e} | "
                f"{'equal' if r['greedy_tokens_equal'] else 'DIFFERENT'} | "
                f"{'-' if theirs is None else f'{theirs:.1e}'} |")
  return "\n".join(rows)


def main(argv):
  del argv
  records = [measure(name) for name in FEATURES]
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "parity.json"), "w") as f:
    json.dump(records, f, indent=2)
  text = table(records)
  with open(os.path.join(_OUT.value, "parity.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  if not all(r["greedy_tokens_equal"] for r in records):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
