"""Pictures from masks: colormaps (:mod:`.colormaps`), overlays and contact sheets (:mod:`.overlay`),
sweep frames (:mod:`.sweep`). Kept apart from the methods: a mask is a ``(gh, gw)`` array, whatever made it."""
