"""Compiled kernels (numba), each a leaf below a plain reference implementation that the tests compare
it with: :mod:`.rollout` (below :func:`vitexplain.methods.rollout_steps.rollout_masks_torch`),
:mod:`.maxflow` (below networkx's maximum flow, :class:`vitexplain.methods.flow.NetworkxFlow`) and
:mod:`.blend` (below :func:`vitexplain.render.overlay.blend_reference`)."""
