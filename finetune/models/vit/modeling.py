"""ViT (and DeiT) in Flax NNX: a frozen config read from the Hugging Face config, then the modules bottom-up.

Numerics follow transformers' ``ViTModel`` / ``ViTForImageClassification``: a strided-convolution patch embedding,
prepended class token (and DeiT's distillation token), learned position embeddings, pre-LayerNorm encoder layers, a
final LayerNorm, and for classification a linear classifier on the class token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError
from finetune.models import heads
from finetune.models.blocks import (
    ACTIVATIONS,
    Attention,
    Dropout,
    Dtype,
    Encoder,
    axes,
    check_activation,
    dense,
    layer_norm,
    recomputed,
)

HEADS = heads.Heads({"feature-extraction": None, "image-classification": heads.CLASSIFIER})


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclasses.dataclass(frozen=True)
class Config:
    """The ViT hyper-parameters the modules use.

    Attributes:
      hidden_size: Model width.
      num_layers: Number of encoder layers.
      num_heads: Attention heads per layer.
      intermediate_size: Width of the MLP.
      hidden_act: Hugging Face activation name of the MLP.
      layer_norm_eps: LayerNorm epsilon.
      image_size: ``(height, width)`` of the input images.
      patch_size: ``(height, width)`` of one patch.
      num_channels: Input channels.
      hidden_dropout: Dropout rate on hidden states.
      attention_dropout: Dropout rate on attention probabilities.
      num_prefix_tokens: Tokens before the patches: 1 (class) for ViT, 2 (class + distillation) for DeiT.
      model_type: ``"vit"`` or ``"deit"``; also the checkpoint key prefix (``vit.``, ``deit.``).
      qkv_bias: Whether the query/key/value projections have biases.
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_prefix_tokens: int = 1
    model_type: str = "vit"
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_hf(cls, hf_config: Any) -> Config:
        """Reads a ``transformers.ViTConfig`` (or ``DeiTConfig``); refuses settings these modules do not implement."""
        check_activation("ViT", "hidden_act", hf_config.hidden_act)
        return cls(
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            hidden_act=hf_config.hidden_act,
            layer_norm_eps=hf_config.layer_norm_eps,
            image_size=_pair(hf_config.image_size),
            patch_size=_pair(hf_config.patch_size),
            num_channels=hf_config.num_channels,
            hidden_dropout=hf_config.hidden_dropout_prob,
            attention_dropout=hf_config.attention_probs_dropout_prob,
            num_prefix_tokens=2 if hf_config.model_type == "deit" else 1,
            model_type=hf_config.model_type,
            qkv_bias=bool(getattr(hf_config, "qkv_bias", True)),
        )


class PatchEmbeddings(nnx.Module):
    """Non-overlapping patches -> vectors, as one strided convolution over NHWC images."""

    def __init__(self, config: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.projection = nnx.Conv(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            strides=config.patch_size,
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_metadata=axes(None, None, None, "embed"),
            bias_metadata=axes("embed"),
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, num_patches, embed]`` in row-major patch order (as PyTorch's flatten)."""
        x = self.projection(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Embeddings(nnx.Module):
    """Patch embeddings with the prefix token(s) prepended and position embeddings added."""

    def __init__(self, config: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        width = config.hidden_size
        self.dtype = dtype
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, width), param_dtype), **axes(None, None, "embed"))
        # DeiT's second prefix token; ViT has none.
        self.distillation_token = (
            nnx.Param(init(rngs.params(), (1, 1, width), param_dtype), **axes(None, None, "embed"))
            if config.num_prefix_tokens == 2
            else None
        )
        num_positions = config.num_patches + config.num_prefix_tokens
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, num_positions, width), param_dtype), **axes(None, None, "embed")
        )
        self.patch_embeddings = PatchEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = Dropout(config.hidden_dropout, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        patches = self.patch_embeddings(images)
        batch = patches.shape[0]
        prefix = [self.cls_token[...]]
        if self.distillation_token is not None:
            prefix.append(self.distillation_token[...])
        prefix = [jnp.broadcast_to(t, (batch, 1, t.shape[-1])).astype(self.dtype) for t in prefix]
        x = jnp.concatenate([*prefix, patches], axis=1) + self.position_embeddings[...].astype(self.dtype)
        return self.dropout(x)


class MLP(nnx.Module):
    """``intermediate`` (embed -> mlp), activation, ``output`` (mlp -> embed)."""

    def __init__(self, config: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.intermediate = dense(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.output = dense(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(recomputed(self.act, self.intermediate(x)))


class Layer(nnx.Module):
    """A pre-LayerNorm encoder layer: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    The attention block is the encoders' shared one (same projections and numerics as BERT's); only the norm
    placement differs.
    """

    def __init__(self, config: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.layernorm_before = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.attention = Attention(config, **kw, qkv_bias=config.qkv_bias)
        self.layernorm_after = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.mlp = MLP(config, **kw)
        self.dropout = Dropout(config.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, queries: jax.Array | None = None) -> jax.Array:
        """``x`` through the layer; with ``queries`` (``[B, Q, H]`` rows of ``x``) only their outputs are computed."""
        normed = self.layernorm_before(x)
        if queries is None:
            x = x + self.dropout(self.attention(normed, mask))
        else:
            x = queries + self.dropout(self.attention(normed, mask, self.layernorm_before(queries)))
        return x + self.dropout(self.mlp(self.layernorm_after(x)))


class ViT(nnx.Module):
    """ViT backbone with the head of its task.

    Args:
      config: The architecture's `Config`.
      task: ``feature-extraction`` (the backbone alone) or ``image-classification``.
      num_labels: Classifier outputs (``image-classification`` only).
      dtype: Compute dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Random streams for initialisation and dropout.

    Example:
      >>> model = ViT(Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
      ...                    image_size=(32, 32), patch_size=(8, 8)), task="image-classification", num_labels=3,
      ...             rngs=nnx.Rngs(0))
      >>> model(pixel_values=jnp.zeros((2, 3, 32, 32))).shape
      (2, 3)
    """

    def __init__(
        self,
        config: Config,
        *,
        task: str = "feature-extraction",
        num_labels: int | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.config = config
        self.embeddings = Embeddings(config, **kw)
        self.encoder = Encoder(config, **kw, layer=Layer)
        self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        heads.build(self, HEADS, task, width=config.hidden_size, num_labels=num_labels, **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """``pixel_values``: ``[B, C, H, W]`` as Hugging Face image processors produce.

        Returns:
          ``[B, num_labels]`` logits for ``image-classification``, else the ``[B, tokens, embed]`` last hidden state.
        """
        channels, (height, width) = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (channels, height, width):
            raise ConfigError(
                f"`pixel_values` must have shape [batch, {channels}, {height}, {width}] (channels first, at the "
                f"checkpoint's image size, as its image processor returns); received shape "
                f"{tuple(pixel_values.shape)}. Run the images through `model.processor`, or transpose channels-last "
                "images with x.transpose(0, 3, 1, 2)."
            )
        x = self.embeddings(jnp.transpose(pixel_values, (0, 2, 3, 1)))
        mask = jnp.ones((x.shape[0], 1, 1, x.shape[1]), bool)  # every token is real
        x = self.layernorm(self.encoder(x, mask, heads.first_rows(HEADS, self.task)))
        return heads.apply(self, HEADS, self.task, x)
