"""Feed-forward experts: a batch of E MLPs, and the dense MLP.

Kernels are float32 parameters cast to the compute dtype at use. Letters:
E experts, N rows per expert, R sorted rows, D model width, H hidden width.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.dispatch import grouped_matmul
from moejax.nn.attention import explicit_spec, weight

ACTIVATIONS = ("gelu", "swiglu")


def _hidden_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid activations: {list(ACTIVATIONS)}")
  # swiglu (Shazeer 2020, "GLU Variants Improve Transformer"): silu(x W_gate) * x W_up.
  return jax.nn.gelu if name == "gelu" else jax.nn.silu


def _kernel_init(batched: bool):
  # LeCun-style fan-in scaling per expert: the expert axis is a batch axis.
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
      batch_axis=(0,) if batched else ())


class _FeedForwardParams(nnx.Module):
  """Kernels `wi` (or `wi_gate`/`wi_up` for swiglu) [*, D, H] and `wo` [*, H, D]."""

  def __init__(self, lead: tuple[int, ...], d_model: int, hidden: int,
               activation: str, dtype, rngs: nnx.Rngs, swiglu_limit: float = 0.0):
    self.activation = activation
    self.swiglu_limit = float(swiglu_limit)
    self.act = _hidden_activation(activation)
    self.dtype = dtype
    init = _kernel_init(batched=bool(lead))
    if activation == "swiglu":
      self.wi_gate = nnx.Param(init(rngs.params(), lead + (d_model, hidden), jnp.float32))
      self.wi_up = nnx.Param(init(rngs.params(), lead + (d_model, hidden), jnp.float32))
    else:
      self.wi = nnx.Param(init(rngs.params(), lead + (d_model, hidden), jnp.float32))
    self.wo = nnx.Param(init(rngs.params(), lead + (hidden, d_model), jnp.float32))

  def _input_kernels(self) -> list[jax.Array]:
    if self.activation == "swiglu":
      return [weight(self.wi_gate, self.dtype), weight(self.wi_up, self.dtype)]
    return [weight(self.wi, self.dtype)]

  def _mlp(self, x: jax.Array, matmul: Callable[[jax.Array, jax.Array], jax.Array],
           out_matmul: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
           hidden_fn: Optional[Callable[[jax.Array], jax.Array]] = None):
    # Named for remat="save_matmuls" (moejax.nn.transformer.MATMUL_NAMES).
    pre = [checkpoint_name(matmul(x, kernel), "ffn_hidden")
           for kernel in self._input_kernels()]
    if len(pre) == 1:
      hidden = self.act(pre[0])
    else:
      gate, up = pre
      if self.swiglu_limit > 0:
        # DeepSeek-V4 (inference/model.py, Expert.forward): the up projection is
        # clamped to [-limit, limit], the gate from above only.
        up = jnp.clip(up, -self.swiglu_limit, self.swiglu_limit)
        gate = jnp.minimum(gate, self.swiglu_limit)
      hidden = self.act(gate) * up
    if hidden_fn is not None:
      hidden = hidden_fn(hidden)
    return (out_matmul or matmul)(hidden.astype(self.dtype), weight(self.wo, self.dtype))


def _per_expert_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[E, N, K] x [E, K, H] -> [E, N, H] with the expert axis as a batch axis
  of the dot (an interceptor such as qwix LoRA then gives every expert its
  own low-rank A and B; an einsum "enk,ekh->enh" would share B)."""
  return jax.lax.dot_general(x, kernel, (((2,), (1,)), ((0,), (0,))))


class Experts(_FeedForwardParams):
  """E independent MLPs with batched kernels [E, D, H] and [E, H, D]."""

  def __init__(self, *, num_experts: int, d_model: int, hidden: int, activation: str,
               dtype=jnp.float32, rngs: nnx.Rngs, swiglu_limit: float = 0.0):
    super().__init__((num_experts,), d_model, hidden, activation, dtype, rngs, swiglu_limit)

  def __call__(self, buffer: jax.Array, hidden_fn=None) -> jax.Array:
    """[E, N, D] -> [E, N, D]: expert e on its N rows. `hidden_fn` (e.g.
    dropout) is applied to the hidden activations."""
    return self._mlp(buffer.astype(self.dtype), _per_expert_matmul, hidden_fn=hidden_fn)

  def grouped(self, rows: jax.Array, group_sizes: jax.Array, block_size: int,
              implementation: Optional[str] = None, hidden_fn=None) -> jax.Array:
    """[R, D] rows sorted by expert -> [R, D] (see `dispatch.grouped_matmul`
    for `block_size` and `implementation`)."""
    return self._mlp(rows.astype(self.dtype),
                     lambda x, w: grouped_matmul(x, w, group_sizes, block_size,
                                                 implementation),
                     hidden_fn=hidden_fn)


class DropoutExperts:
  """The `dispatch.base.Experts` contract for `experts` with dropout on their
  hidden units: expert dropout (Switch Transformer, Fedus et al. 2021, §2.4,
  uses a higher rate inside the experts than elsewhere). Inverted dropout:
  kept units are scaled by 1 / (1 - rate)."""

  def __init__(self, experts, rate: float, rng: jax.Array):
    self.experts = experts
    self.rate = rate
    self.rng = rng

  def _drop(self, hidden: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(self.rng, 1.0 - self.rate, hidden.shape)
    return jnp.where(keep, hidden / (1.0 - self.rate), 0).astype(hidden.dtype)

  def __call__(self, buffer: jax.Array) -> jax.Array:
    return self.experts(buffer, hidden_fn=self._drop)

  def grouped(self, rows: jax.Array, group_sizes: jax.Array, block_size: int,
              implementation: Optional[str] = None) -> jax.Array:
    return self.experts.grouped(rows, group_sizes, block_size, implementation,
                                hidden_fn=self._drop)


class MLP(_FeedForwardParams):
  """A dense MLP with kernels [D, H] and [H, D], applied to [T, D] tokens."""

  def __init__(self, *, d_model: int, hidden: int, activation: str,
               dtype=jnp.float32, rngs: nnx.Rngs, swiglu_limit: float = 0.0):
    super().__init__((), d_model, hidden, activation, dtype, rngs, swiglu_limit)

  def __call__(self, x: jax.Array) -> jax.Array:
    # 2-D dots: a 3-D operand ran ~2.2x slower forward+backward on XLA:CPU.
    lead = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    # On an Explicit mesh with hidden units split over "model" the output dot
    # contracts a sharded axis: name its (batch-sharded) result layout.
    out_matmul = functools.partial(jnp.dot, out_sharding=explicit_spec(tokens))
    y = self._mlp(tokens, jnp.dot, out_matmul)
    return y.reshape(lead + (y.shape[-1],))
