"""The DVT cascade in MindSpore, the mirror image of `dvt_torch.dvt`.

Parameter names equal the release's state-dict keys up to LayerNorm's gamma/beta, so
`convert.py` maps weights 1:1. Every geometric choice comes from a `dvt_shared` config.
`construct` is plain enough for graph mode (`ms.jit` or `ms.GRAPH_MODE`); input checks
run in Python before it, so their messages stay readable.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer

from dvt_shared.cascade import CascadeModel, ReuseState
from dvt_shared.configs import DVTConfig
from dvt_shared.image_checks import check_finite, check_image_dtype, check_image_shape
from dvt_shared.token_schedule import resample_matrix_1d, sinusoid_table

from .layers import (
    Block,
    PatchEmbed,
    PointwiseConv2d,
    T2TStem,
    class_token,
    dense,
    forget_compiled_graphs,
    gelu,
    layer_norm,
    resample_relations,
)

_FLOAT_DTYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


def check_images(x: Tensor, config: DVTConfig, dtype=None, values: bool = True) -> None:
    """Reject anything but a floating (B, C, H, W) batch of the config's size (in `dtype`, if given), and
    with `values`, one holding NaN or Inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a mindspore.Tensor, got {type(x).__name__}")
    check_image_shape(x.shape, config)
    check_image_dtype(x.dtype, x.dtype in _FLOAT_DTYPES, dtype)
    if not values:
        return
    # One reduction in the common case; the per-image scan only to word the error.
    finite = ops.isfinite(x)
    if not bool(finite.all()):
        check_finite(finite.reshape(x.shape[0], -1).all(axis=1).asnumpy())


class DVTStage(nn.Cell):
    """One complete backbone of the cascade: stem, class token, positions, blocks, norm, head.

    `construct(x, features, relations)` returns (logits, features, relations); the last two
    are what the next stage reuses, None where it reuses nothing (and after the last stage).
    """

    def __init__(self, config: DVTConfig, index: int):
        super().__init__()
        stage = config.stages[index]
        self.grid = config.grids[index]
        self.feature_reuse, self.relation_reuse = config.stage_reuses(index)
        has_next = index < config.num_exits - 1
        self.keep_features = has_next and config.feature_reuse
        self.keep_relations = has_next and config.relation_reuse
        self.depth, self.num_heads = config.depth, config.num_heads
        num_tokens = config.num_tokens[index]

        self.is_t2t = stage.stem.kind == "t2t"
        if self.is_t2t:
            self.tokens_to_token = T2TStem(config, index)
        else:
            self.patch_embed = PatchEmbed(config, index)
        dim = config.embed_dim
        self.cls_token = Parameter(initializer(TruncatedNormal(sigma=0.02), (1, 1, dim), ms.float32), name="cls_token")
        if config.pos_embed == "sinusoid":
            table = Tensor(sinusoid_table(num_tokens, dim))
            self.pos_embed = Parameter(table, name="pos_embed", requires_grad=False)
        else:
            self.pos_embed = Parameter(
                initializer(TruncatedNormal(sigma=0.02), (1, num_tokens, dim), ms.float32), name="pos_embed"
            )
        self.pos_drop = nn.Dropout(p=config.drop_rate)
        self.blocks = nn.CellList([Block(config, index, rate) for rate in config.drop_path_rates])
        self.norm = layer_norm(dim, config.layernorm_eps)

        if self.feature_reuse or self.relation_reuse:
            matrix = resample_matrix_1d(config.grids[index - 1], self.grid).T
            self.resample_t = Tensor(matrix, ms.float32)
            # float64 runs get the exact map: entries such as 1/3 are not float32 numbers
            self.resample_t_float64 = Tensor(matrix, ms.float64)
        else:
            self.resample_t = self.resample_t_float64 = None
        if self.relation_reuse:
            channels = config.relation_channels
            hidden = config.relation_hidden
            self.relation_reuse_conv = nn.SequentialCell(
                [PointwiseConv2d(channels, hidden), gelu(), PointwiseConv2d(hidden, channels)]
            )
        self.head = dense(dim, config.num_classes)

    def embed(self, x):
        x = self.tokens_to_token(x) if self.is_t2t else self.patch_embed(x)
        cls = ops.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[2]))
        return self.pos_drop(ops.cat((cls, x), axis=1) + self.pos_embed)

    def relation_biases(self, relations, resample_t):
        """Previous logits -> 1x1 convs -> both token axes resampled -> one (B, heads, N, N) bias per block."""
        mixed = resample_relations(self.relation_reuse_conv(relations), resample_t)
        return ops.chunk(mixed, self.depth, axis=1)

    def tokens(self, x, features=None, relations=None):
        """Last-block tokens before the final norm, and every block's attention logits."""
        x = self.embed(x)
        resample_t = self.resample_t_float64 if x.dtype == ms.float64 else self.resample_t
        biases = self.relation_biases(relations, resample_t) if self.relation_reuse else (None,) * self.depth
        logits = ()
        for block, bias in zip(self.blocks, biases):
            x, block_logits = block(x, features, resample_t, bias)
            logits = logits + (block_logits,)
        return x, logits

    def forward_head(self, tokens, pre_logits: bool = False):
        """The class token's logits (or the class token itself, `pre_logits`) of normalised tokens."""
        return class_token(tokens) if pre_logits else self.head(class_token(tokens))

    def construct(self, x, features=None, relations=None):
        x, logits = self.tokens(x, features, relations)
        out = self.head(class_token(self.norm(x)))
        next_features = x if self.keep_features else None
        next_relations = ops.cat(logits, axis=1) if self.keep_relations else None
        return out, next_features, next_relations


class DVT(CascadeModel, nn.Cell):
    """The cascade, with the PyTorch twin's (timm's) model contract (input checks included: NaN and Inf
    are looked for in eval mode only).

    `model.forward_exits(x)` returns the per-exit logits, fewest tokens first. `model(x)`
    returns them too in training mode; in eval mode (a Cell's default) it returns the last
    exit's logits alone. `forward_stage(k, x, state)` runs exit k alone given what exit k-1
    returned; real early exit is built on it.
    """

    def __init__(self, config: DVTConfig):
        super().__init__()
        self._set_cascade(config)
        for index, name in enumerate(self.stage_names):
            setattr(self, name, DVTStage(config, index))

    @property
    def dtype(self):
        """The dtype the model computes in, which its input must have."""
        return self.stage(0).cls_token.dtype

    def forward_stage(self, index: int, x: Tensor, state: ReuseState | None = None) -> tuple[Tensor, ReuseState]:
        """Logits of exit `index` and the reuse state the next exit needs."""
        check_images(x, self.config, self.dtype, values=not self.training)
        return self.run_stage(index, x, state)

    def __call__(self, x):
        # Checked here, in Python, so that graph mode compiles only the model itself.
        check_images(x, self.config, self.dtype, values=not self.training)
        if self.training:
            # Graph mode keeps a Cell's graph with the training flag it was first compiled under, so
            # the per-exit tuple of training comes from the stage graphs, never from the eval graph.
            return self.run_exits(x)
        return super().__call__(x)

    def construct(self, x):
        outputs = ()
        features, relations = None, None
        for name in self.stage_names:
            logits, features, relations = getattr(self, name)(x, features, relations)
            outputs = outputs + (logits,)
        if self.training:
            return outputs
        return outputs[-1]

    def forward_exits(self, x: Tensor) -> tuple[Tensor, ...]:
        """Every exit's logits, fewest tokens first, in any mode (each stage its own graph in graph mode)."""
        check_images(x, self.config, self.dtype, values=not self.training)
        return self.run_exits(x)

    def run_exits(self, x: Tensor) -> tuple[Tensor, ...]:
        """`forward_exits` without input checks."""
        outputs, state = (), None
        for index in range(self.num_exits):
            logits, state = self.run_stage(index, x, state)
            outputs = outputs + (logits,)
        return outputs

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's normalised tokens (B, N, D), class token first; the earlier stages run for their reuse."""
        check_images(x, self.config, self.dtype, values=not self.training)
        state = ReuseState(None, None)
        for index in range(self.num_exits - 1):
            _, state = self.run_stage(index, x, state)
        last = self.stage(self.num_exits - 1)
        tokens, _ = last.tokens(x, state.features, state.relations)
        return last.norm(tokens)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads for `num_classes` on every exit (identities for 0: the model then returns class tokens)."""
        self._check_classifier_reset(num_classes, global_pool)
        for index, name in enumerate(self.stage_names):
            self.stage(index).head = dense(self.num_features, num_classes) if num_classes else nn.Identity()
            # A Cell set on a stage that already belongs to the model is named from the stage down only.
            for param in self.stage(index).head.get_parameters():
                param.name = f"{name}.{param.name}"
        self._record_num_classes(num_classes)
        forget_compiled_graphs(self)


def multi_exit_loss(
    outputs: tuple[Tensor, ...], targets: Tensor, weights: tuple[float, ...] | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The release's training loss: the (optionally weighted) sum of per-exit cross-entropies."""
    weights = weights or (1.0,) * len(outputs)
    if len(weights) != len(outputs):
        raise ValueError(f"got {len(weights)} exit weights for {len(outputs)} exits")
    loss = 0.0
    for weight, logits in zip(weights, outputs):
        loss = loss + weight * ops.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return loss
