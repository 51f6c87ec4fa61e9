"""The DVT cascade in PyTorch: stages with more and more tokens, feature and relation reuse.

State-dict keys and shapes equal the published release's, so its checkpoints load with
`strict=True`. Every geometric choice comes from a `dvt_shared` config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices  # as timm's own models import it
from torch import nn

from dvt_shared.cascade import CascadeModel, ReuseState
from dvt_shared.configs import DVTConfig
from dvt_shared.image_checks import check_finite, check_image_dtype, check_image_shape
from dvt_shared.token_schedule import resample_matrix_1d, sinusoid_table

from .layers import Block, PatchEmbed, PointwiseConv2d, T2TStem, init_weights, resample_relations


# A leaf call when torch.fx traces a model (timm's feature extraction): it runs on the real batch then.
@register_notrace_function
def check_images(x: torch.Tensor, config: DVTConfig, dtype: torch.dtype | None = None, values: bool = True) -> None:
    """Reject anything but a floating (B, C, H, W) batch of the config's size (in `dtype`, if given), and
    with `values`, one holding NaN or Inf (a meta tensor holds no values to scan).

    Any memory layout is accepted (channels-last, strided views): every layer reads by index.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    check_image_shape(x.shape, config)
    check_image_dtype(x.dtype, x.is_floating_point(), dtype)
    if not values or x.is_meta:
        return
    # One reduction in the common case; the per-image scan only to word the error.
    if not bool(torch.isfinite(x).all()):
        check_finite(torch.isfinite(x).flatten(1).all(dim=1).cpu().numpy())


class DVTStage(nn.Module):
    """One complete backbone of the cascade: stem, class token, positions, blocks, norm, head."""

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

        if stage.stem.kind == "t2t":
            self.tokens_to_token = T2TStem(config, index)
        else:
            self.patch_embed = PatchEmbed(config, index)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        if config.pos_embed == "sinusoid":
            self.register_buffer("pos_embed", torch.from_numpy(sinusoid_table(num_tokens, config.embed_dim)))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, config.embed_dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(
            Block(config, index, rate) for rate in config.drop_path_rates
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps)

        # (s, t) one-axis map from the previous grid, None where the stage reuses nothing
        reuses = self.feature_reuse or self.relation_reuse
        self.resample_grids = (config.grids[index - 1], self.grid) if reuses else None
        self.register_buffer("resample_t", self.resample_matrix(torch.float32, None), persistent=False)
        if self.relation_reuse:
            channels = config.relation_channels
            hidden = config.relation_hidden
            self.relation_reuse_conv = nn.Sequential(
                PointwiseConv2d(channels, hidden), nn.GELU(), PointwiseConv2d(hidden, channels)
            )
        self.head = nn.Linear(config.embed_dim, config.num_classes)

        trunc_normal_(self.cls_token, std=0.02)
        if config.pos_embed == "learned":
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def resample_matrix(self, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor | None:
        """The transposed resampling map of dvt_shared in `dtype`, rounded once from its float64 entries."""
        if self.resample_grids is None:
            return None
        return torch.tensor(resample_matrix_1d(*self.resample_grids).T, dtype=dtype, device=device)

    def _apply(self, fn, recurse=True):
        # `.double()`, `.half()`, `.to(...)` convert buffers from their current values; the map is rebuilt
        # from its exact entries instead (entries such as 1/3 are not float32 numbers), so that a float64
        # model computes in float64 throughout.
        super()._apply(fn, recurse)
        if self.resample_t is not None:
            self.resample_t = self.resample_matrix(self.resample_t.dtype, self.resample_t.device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.tokens_to_token if hasattr(self, "tokens_to_token") else self.patch_embed
        x = stem(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def relation_biases(self, relations: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Previous logits -> 1x1 convs -> both token axes resampled -> one (B, heads, N, N) bias per block."""
        mixed = resample_relations(self.relation_reuse_conv(relations), self.resample_t)
        # Sliced by index, not `chunk`: torch.fx traces a fixed number of slices, not an unknown-length split.
        heads = self.num_heads
        return tuple(mixed[:, block * heads:(block + 1) * heads] for block in range(self.depth))

    def forward_features(
        self, x: torch.Tensor, features: torch.Tensor | None = None, relations: torch.Tensor | None = None,
        taps: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(normalised tokens (B, N, D) with the class token first, features, relations): the last two
        are what the next stage reuses, None where it reuses nothing (and after the last stage).

        `taps`, a list, receives every block's output tokens (before the norm): forward_intermediates' features.
        """
        x = self.embed(x)
        biases = self.relation_biases(relations) if self.relation_reuse else (None,) * self.depth
        reused = features if self.feature_reuse else None
        logits = []
        for block, bias in zip(self.blocks, biases):
            x, block_logits = block(x, reused, self.resample_t if self.feature_reuse else None, bias)
            logits.append(block_logits)
            if taps is not None:
                taps.append(x)
        next_features = x if self.keep_features else None
        next_relations = torch.cat(logits, dim=1) if self.keep_relations else None
        return self.norm(x), next_features, next_relations

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token's logits (or the class token itself, `pre_logits`)."""
        return tokens[:, 0] if pre_logits else self.head(tokens[:, 0])

    def forward(
        self, x: torch.Tensor, features: torch.Tensor | None = None, relations: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits, features, relations): the stage contract of `dvt_shared.cascade`."""
        tokens, next_features, next_relations = self.forward_features(x, features, relations)
        return self.forward_head(tokens), next_features, next_relations


class DVT(CascadeModel, nn.Module):
    """The cascade, with timm's model contract.

    Input checks: shape and dtype always; NaN and Inf in eval mode only. A training batch comes from
    the data pipeline, and scanning its values would cost a host synchronisation every step on a GPU.

    `model.forward_exits(x)` returns the per-exit logits, fewest tokens first (the release's
    output). `model(x)` returns them too in training mode (the loss needs every exit); in
    eval mode it returns the last exit's logits alone, the prediction of the whole cascade
    that every timm user expects from one tensor. `forward_stage(k, x, state)` runs exit k
    alone given what exit k-1 returned; real early exit (`AdaptiveDVT`) is built on it.

    timm's features (`features_only=True`, `forward_intermediates`) are the last stage's blocks,
    one `feature_info` entry each: the finest token grid, seen after every earlier stage's reuse.
    """

    def __init__(self, config: DVTConfig):
        super().__init__()
        self._set_cascade(config)
        for index, name in enumerate(self.stage_names):
            self.add_module(name, DVTStage(config, index))
        self.feature_info = [
            dict(num_chs=config.embed_dim, reduction=config.img_size // config.grids[-1],
                 module=f"{self.stage_names[-1]}.blocks.{block}")
            for block in range(config.depth)
        ]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in, which its input must have."""
        return self.stage(0).cls_token.dtype

    def forward_stage(
        self, index: int, x: torch.Tensor, state: ReuseState | None = None
    ) -> tuple[torch.Tensor, ReuseState]:
        """Logits of exit `index` and the reuse state the next exit needs."""
        check_images(x, self.config, self.dtype, values=not self.training)
        return self.run_stage(index, x, state)

    def forward_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every exit's logits, fewest tokens first, in any mode."""
        check_images(x, self.config, self.dtype, values=not self.training)
        outputs, state = [], None
        for index in range(self.num_exits):
            logits, state = self.run_stage(index, x, state)
            outputs.append(logits)
        return tuple(outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's normalised tokens (B, N, D), class token first; the earlier stages run for their
        reuse."""
        check_images(x, self.config, self.dtype, values=not self.training)
        return self._last_stage_tokens(x)

    def _last_stage_tokens(self, x: torch.Tensor, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`forward_features` without input checks; `taps` receives the last stage's block outputs
        (see `DVTStage.forward_features`)."""
        state = None
        for index in range(self.num_exits - 1):
            _, state = self.run_stage(index, x, state)
        state = state or ReuseState(None, None)
        return self.stage(self.num_exits - 1).forward_features(x, state.features, state.relations, taps)[0]

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature-getter interface (`features_only=True`), as its ViTs have it: the tokens of the
        last stage's blocks, class token dropped, as (B, D, g, g) maps ("NCHW") or (B, g*g, D) ("NLC") on
        its g x g grid; and, unless `intermediates_only`, `forward_features`' output.

        `indices`: every block (None), the last n (an int) or those listed; `norm` applies the last
        stage's norm to each. Every block runs (`stop_early` changes nothing): to drop the blocks after the
        last one taken, prune them (`prune_intermediate_layers`).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"{self.config.name}: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        check_images(x, self.config, self.dtype, values=not self.training)
        last = self.stage(self.num_exits - 1)
        take, _ = feature_take_indices(len(last.blocks), indices)
        taps = []
        tokens = self._last_stage_tokens(x, taps)
        intermediates = []
        for block in take:
            grid_tokens = (last.norm(taps[block]) if norm else taps[block])[:, 1:]
            if output_fmt == "NCHW":
                grid_tokens = grid_tokens.reshape(x.shape[0], last.grid, last.grid, -1).permute(0, 3, 1, 2)
                grid_tokens = grid_tokens.contiguous()
            intermediates.append(grid_tokens)
        return intermediates if intermediates_only else (tokens, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning to a feature backbone: the last stage's blocks after the last one in `indices` go,
        its norm too with `prune_norm`. `prune_head` replaces every exit's head with an identity, and the
        earlier stages' norms, which feed nothing but their heads. Returns the absolute indices to take."""
        last = self.stage(self.num_exits - 1)
        take, last_taken = feature_take_indices(len(last.blocks), indices)
        last.blocks = last.blocks[: last_taken + 1]
        if prune_norm:
            last.norm = nn.Identity().train(self.training)
        if prune_head:
            self.reset_classifier(0)
            for index in range(self.num_exits - 1):
                self.stage(index).norm = nn.Identity().train(self.training)
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.forward_exits(x)
        return outputs if self.training else outputs[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads for `num_classes` on every exit (identities for 0: the model then returns class tokens),
        on the model's device and dtype, in its stage's training mode."""
        self._check_classifier_reset(num_classes, global_pool)
        for index in range(self.num_exits):
            stage = self.stage(index)
            device, dtype = stage.cls_token.device, stage.cls_token.dtype
            if num_classes:
                head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
                head.apply(init_weights)
            else:
                head = nn.Identity()
            stage.head = head.train(stage.training)
        self._record_num_classes(num_classes)


def multi_exit_loss(
    outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, weights: tuple[float, ...] | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The release's training loss: the (optionally weighted) sum of per-exit cross-entropies."""
    weights = weights or (1.0,) * len(outputs)
    if len(weights) != len(outputs):
        raise ValueError(f"got {len(weights)} exit weights for {len(outputs)} exits")
    return sum(w * F.cross_entropy(o, targets, label_smoothing=label_smoothing) for w, o in zip(weights, outputs))
