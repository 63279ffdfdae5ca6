"""Decoder-only transformer as Flax Linen modules, used only through the pure `apply`.

Shapes: B batch, T sequence, D d_model, N query heads, K key/value heads, H head size, F MLP width,
V vocab. Every parameter carries logical axis names ("vocab", "embed", "heads", "kv_heads",
"head_dim", "mlp", "pos") so a rules table can map them onto a device mesh (see
`param_logical_axes`).

GPT-2 layout per Radford et al. 2019 (and nanoGPT's model.py): token + learned position embeddings,
pre-LayerNorm blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, a final LayerNorm, GELU (tanh
approximation, Hugging Face's "gelu_new"), biases on every projection, output head tied to the
token embedding.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig

Params = dict


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _dense(
    config: TransformerConfig,
    features: int | tuple[int, ...],
    kernel_axes: tuple[str, ...],
    *,
    std: float,
    name: str,
    axis: int | tuple[int, ...] = -1,
) -> nn.DenseGeneral:
    """A biased projection whose kernel and bias carry logical axis names (bias: output axes)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=_init(std, kernel_axes),
        bias_init=_zeros(kernel_axes[-n_out:]),
        name=name,
    )


def _residual_std(config: TransformerConfig) -> float:
    """GPT-2 paper: projections into the residual stream start at N(0, 0.02/sqrt(2·L))."""
    return 0.02 / math.sqrt(2 * config.n_layers)


def _layer_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=_ones(("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections (grouped-query when K < N)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        std, out_std = 0.02, _residual_std(cfg)

        q = _dense(cfg, (n, h), ("embed", "heads", "head_dim"), std=std, name="wq")(x)  # [B,T,N,H]
        kk = _dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), std=std, name="wk")(x)  # [B,T,K,H]
        v = _dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), std=std, name="wv")(x)  # [B,T,K,H]
        # One fused call: XLA on CPU/TPU, cuDNN flash attention on GPUs where available.
        out = jax.nn.dot_product_attention(q, kk, v, is_causal=True)  # [B,T,N,H]
        out = _dense(
            cfg, cfg.d_model, ("heads", "head_dim", "embed"), std=out_std, name="wo", axis=(-2, -1)
        )(out)  # [B,T,D]
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


class MLP(nn.Module):
    """Position-wise feed-forward: down(gelu_tanh(up(x)))."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, cfg.ff_dim, ("embed", "mlp"), std=0.02, name="up")(x)  # [B,T,F]
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
        out = _dense(cfg, cfg.d_model, ("mlp", "embed"), std=_residual_std(cfg), name="down")(h)  # [B,T,D]
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        x = x + Attention(self.config, name="attn")(
            _layer_norm(self.config, "ln_1")(x), deterministic=deterministic
        )
        x = x + MLP(self.config, name="mlp")(
            _layer_norm(self.config, "ln_2")(x), deterministic=deterministic
        )
        return x  # [B,T,D]


class Transformer(nn.Module):
    """Decoder-only language model. Call through `Transformer(config).apply({"params": p}, ...)`.

    Args (of `__call__`):
      tokens: int32 [B, T] token ids, T <= config.max_seq_len.
      positions: optional int32 [B, T] position ids (default 0..T-1 for every row).
      deterministic: False enables dropout; `apply` then needs `rngs={"dropout": key}`.
      return_hidden: return the final normalised hidden states [B, T, D] instead of logits
        (for value / reward heads and for chunked log-prob computation).

    Returns:
      logits [B, T, V] in `config.dtype` (or hidden states [B, T, D] with `return_hidden`).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")),
        )
        self.pos_embed = nn.Embed(
            cfg.max_seq_len,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_init(0.01, ("pos", "embed")),
        )
        self.layers = [Block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.ln_f = _layer_norm(cfg, "ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_init(0.02, ("embed", "vocab")),
            )
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> jax.Array:
        chex.assert_rank(tokens, 2)
        b, t = tokens.shape
        if t > self.config.max_seq_len:
            raise ValueError(
                f"tokens: sequence length {t} exceeds config.max_seq_len={self.config.max_seq_len}"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        chex.assert_equal_shape((tokens, positions))
        x = self.embed(tokens) + self.pos_embed(positions)  # [B,T,D]
        x = self.drop(x, deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, deterministic=deterministic)  # [B,T,D]
        x = self.ln_f(x)  # [B,T,D]
        if return_hidden:
            return x
        return self.logits_from_hidden(x)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Output head: hidden [..., D] -> logits [..., V] (tied: hidden @ embeddingᵀ)."""
        if self.config.tie_embeddings:
            return self.embed.attend(hidden)
        return self.lm_head(hidden)


def init_params(config: TransformerConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (GPT-2 init: N(0, 0.02), residual outputs / sqrt(2L)).

    Args:
      config: the model.
      rng: a `jax.random.key`.

    Returns:
      The parameter pytree (plain arrays in `config.param_dtype`, logical-axis boxes removed).
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(Transformer(config).init)(rng, tokens)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: TransformerConfig) -> Params:
    """Pytree (same structure as the params) of `PartitionSpec`s of logical axis names.

    Computed by abstract evaluation; no parameter memory is allocated.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


def forward(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Pure forward pass: logits [B, T, V] (in `config.dtype`) for int32 tokens [B, T].

    Args:
      params: parameter pytree from `init_params` or `load_hf_checkpoint`.
      config: the model's `TransformerConfig`.
      tokens: int32 [B, T].
      positions: optional int32 [B, T] position ids (default 0..T-1).
      dropout_rng: a key enables dropout (training); None runs deterministically.
      return_hidden: return final hidden states [B, T, D] instead of logits.

    Raises:
      ValueError: T exceeds `config.max_seq_len`.
    """
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return Transformer(config).apply(
        {"params": params},
        tokens,
        positions,
        deterministic=dropout_rng is None,
        return_hidden=return_hidden,
        rngs=rngs,
    )


def logits_from_hidden(params: Params, config: TransformerConfig, hidden: jax.Array) -> jax.Array:
    """Applies the output head to hidden states [..., D] -> logits [..., V]."""
    return Transformer(config).apply(
        {"params": params}, hidden, method=Transformer.logits_from_hidden
    )
