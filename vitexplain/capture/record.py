"""Recording every block's attention probabilities (and their gradients) from a timm ViT.

timm's ``Attention`` runs fused ``scaled_dot_product_attention`` by default, which never materialises the
attention matrix. While recording, each block's attention is switched to timm's explicit path
(``fused_attn = False``: ``softmax(q·kᵀ·scale)`` then ``attn_drop``) and a forward hook on ``attn_drop``
keeps its output: exactly the matrix the block multiplies with ``v``. Both paths compute the same
function; logits agree to float rounding (tested). Without gradients, plain blocks on CPU are recorded
through the native attention kernel instead (:mod:`.native`), with the explicit path as its fallback.
Every recorded map is checked (:mod:`.support`): its shape at once, its values after the pass, all layers'
statistics in one copy from the device.

Gradients are taken with ``torch.autograd.grad`` with respect to the recorded tensors themselves, so they
come back in layer order (module backward hooks would deliver them last layer first).

When the classifier reads the prefix tokens only (token pooling), the last block updates only those: its
attention is still computed, and recorded, over all tokens, but its MLP skips the patch tokens, whose
outputs nothing reads.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .fusion import Fusion, fuse_heads
from .native import NativeState, has_native_kernel, native_recording_forward
from .support import check_shape, check_statistics, row_statistics
from .tokens import TokenLayout, pool_input, readout_weights, token_layout


@dataclass
class Capture:
    """One forward pass: logits ``(B, C)``, attentions ``L × (B, H, N, N)``, readout ``(B, N)``."""

    logits: Tensor
    attentions: list[Tensor]
    readout: Tensor
    layout: TokenLayout
    block_outputs: list[Tensor] | None = None  # z_l per block, with ``block_outputs=True``
    entering: dict[int, Tensor] | None = None  # h_l, the tokens entering block l, with ``entering=(l, …)``

    def gradients(self, targets: Tensor, retain_graph: bool = True,
                  layers: Sequence[int] | None = None) -> list[Tensor | None]:
        """``∂y_{b,c_b}/∂A_l`` for every layer (or only ``layers``; the others ``None``), in layer order;
        ``targets`` is ``(B,)``. Only what those gradients need is back-propagated: for the last layer alone,
        the head and the last block.

        Batch items are independent, so the gradient of ``Σ_b y_{b,c_b}`` with
        respect to ``A_l[b]`` is that of item ``b``'s own target logit.
        """
        if not self.attentions[0].requires_grad:
            raise RuntimeError("capture was recorded without gradients; use capture_attention(..., with_grad=True)")
        score = self.logits.gather(1, targets.view(-1, 1).to(self.logits.device)).sum()
        return self.gradients_of(score, range(len(self.attentions)) if layers is None else layers, retain_graph)

    def gradients_of(self, score: Tensor, layers: Sequence[int], retain_graph: bool = True) -> list[Tensor | None]:
        """``∂score/∂A_l`` for the blocks ``layers`` (``None`` for the others), in layer order."""
        chosen = sorted(set(layers))
        found = torch.autograd.grad(score, [self.attentions[i] for i in chosen], retain_graph=retain_graph)
        gradients: list[Tensor | None] = [None] * len(self.attentions)
        for index, gradient in zip(chosen, found):
            gradients[index] = gradient
        return gradients


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block, first block first."""
    return [block.attn for block in model.blocks]


class Recorded(list):
    """The recorded maps, layer by layer, and the row statistics of each for the check after the pass."""

    def __init__(self):
        super().__init__()
        self.statistics: list[tuple[nn.Module, Tensor]] = []


@contextmanager
def explicit_attention(model: nn.Module, fusion: Fusion | None = None) -> Iterator[list[Tensor]]:
    """Within the context, each block's attention probabilities are appended to the yielded list as they
    are produced: ``(B, H, N, N)``, or ``(B, 1, N, N)`` fused over heads with ``fusion`` if given. Each is
    checked by shape before it is kept; ``recorded.statistics`` holds ``(module, row statistics)`` for
    :func:`.support.check_statistics`, which :func:`capture_attention` calls after the pass."""
    modules = attention_modules(model)
    recorded = Recorded()

    def keep(attention: Tensor) -> Tensor:
        return fuse_heads(attention.float(), fusion).unsqueeze(1) if fusion else attention

    def recorder(module: nn.Module):
        def hook(_dropout, _inputs, attention: Tensor) -> None:
            check_shape(attention, module)
            recorded.statistics.append((module, row_statistics(attention)))
            recorded.append(keep(attention))
        return hook

    hooks = [m.attn_drop.register_forward_hook(recorder(m)) for m in modules]
    native = [m for m in modules if has_native_kernel(m)]
    state = NativeState()
    for module in native:
        module.forward = native_recording_forward(module, recorded, fusion, keep, state)
    try:
        with explicit_path(modules):
            yield recorded
    finally:
        for hook in hooks:
            hook.remove()
        for module in native:
            del module.forward


@contextmanager
def explicit_path(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the context, timm attention ``modules`` run their explicit path (``fused_attn = False``), where the
    probabilities are a tensor that hooks on ``attn_drop`` see; restored after."""
    saved = [getattr(m, "fused_attn", None) for m in modules]
    for module in modules:
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    try:
        yield
    finally:
        for module, fused in zip(modules, saved):
            if fused is not None:
                module.fused_attn = fused


@contextmanager
def separated_blocks(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the context, each block reads a detached copy of the previous block's output (the same values)
    and its output ``z_l`` is appended to the yielded list. Then ``z_l`` depends on block ``l``'s attention
    alone, not on earlier blocks', so one backward pass of ``Σ_l s(z_l)`` gives every ``∂s(z_l)/∂A_l``."""
    outputs: list[Tensor] = []
    hooks = []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(lambda _m, args: (args[0].detach(), *args[1:])))
        hooks.append(block.register_forward_hook(lambda _m, _args, output: outputs.append(output)))
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def entering_blocks(model: nn.Module, positions: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the context, the tokens entering block ``l`` for each ``l`` of ``positions`` are kept in the
    yielded dict, ``(B, N, C)``; ``l = depth`` is the last block's output, entering the final norm."""
    depth = len(model.blocks)
    bad = [p for p in positions if not 0 <= p <= depth]
    if bad:
        raise ValueError(f"block position {bad[0]} is outside 0…{depth} for a model of {depth} blocks")
    found: dict[int, Tensor] = {}

    def keeper(position: int):
        def hook(_module, args):
            found[position] = args[0]
        return hook

    hooks = [(model.blocks[p] if p < depth else model.norm).register_forward_pre_hook(keeper(p)) for p in positions]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def prefix_only_last_block(model: nn.Module, layout: TokenLayout, enabled: bool = True) -> Iterator[None]:
    """Within the context, the last block returns only the prefix tokens, if the head reads nothing else.

    With token pooling the logits depend on the last block's output ``x'[:, :p]`` alone
    (``p`` prefix tokens). timm's ``Block`` computes ``x' = x + a(x)`` then
    ``x' + mlp(x')`` token by token after attention, so
    ``x'[:, :p] = x[:, :p] + a(x)[:, :p]`` and the MLP needs only those rows: the
    logits are the same and the work saved is the MLP of all patch tokens of one block.
    Other block types and heads (average, attention pool) are left as they are.
    """
    block = model.blocks[-1]
    applies = enabled and bool(layout.protected_tokens) and type(block) is Block
    if applies:
        keep = layout.num_prefix_tokens

        def forward(x: Tensor, **kwargs) -> Tensor:
            x = x[:, :keep] + block.drop_path1(block.ls1(block.attn(block.norm1(x), **kwargs)))[:, :keep]
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

        block.forward = forward
    try:
        yield
    finally:
        if applies:
            del block.forward


def capture_attention(model: nn.Module, images: Tensor, with_grad: bool = False,
                      fusion: Fusion | None = None, block_outputs: bool = False,
                      entering: Sequence[int] = ()) -> Capture:
    """Run ``model`` on ``images`` ``(B, 3, H, W)`` and record what the methods need.

    With ``with_grad`` the graph is kept so that :meth:`Capture.gradients` can
    differentiate target logits with respect to each layer's attention. With a
    ``fusion``, each layer's heads are fused as soon as they are produced,
    ``(B, H, N, N) → (B, 1, N, N)``, so that the full maps of all layers are never
    held at once. With ``block_outputs`` every block's output ``z_l`` is kept too, each block reading a
    detached copy of the previous one's (:func:`separated_blocks`; the same logits). With ``entering`` the tokens
    entering those blocks are kept (:func:`entering_blocks`; ``len(model.blocks)``: the last block's output). Raises
    :class:`.support.UnsupportedModelError` if a block records something other than its attention matrix.
    """
    layout = token_layout(model, tuple(images.shape[-2:]))
    grad_mode = torch.enable_grad() if with_grad else torch.no_grad()
    separated = separated_blocks(model) if block_outputs else nullcontext(None)
    with grad_mode, explicit_attention(model, fusion) as attentions, pool_input(model) as pooled, \
            prefix_only_last_block(model, layout, enabled=len(model.blocks) not in entering), separated as outputs, \
            entering_blocks(model, entering) as tokens:
        logits = model(images)
    check_statistics(attentions.statistics)
    if len(attentions) != len(model.blocks):
        raise RuntimeError(f"recorded {len(attentions)} attention maps for {len(model.blocks)} blocks")
    if attentions[0].shape[-1] != layout.num_tokens:  # checked on the last axis, which fusion keeps
        raise RuntimeError(
            f"attention covers {attentions[0].shape[-1]} tokens, expected {layout.num_prefix_tokens} prefix + "
            f"{layout.grid[0]}×{layout.grid[1]} patches"
        )
    readout = readout_weights(model, layout, images.shape[0], pooled[0] if pooled else None, images.device)
    return Capture(logits, list(attentions), readout, layout, outputs, tokens if entering else None)
