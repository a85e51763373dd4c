"""Hand-written image coders (compiled with numba), kept because they are decisively faster on the main
job than Pillow's (docs/performance.md): :mod:`.png` (overlays), :mod:`.gif` with :mod:`.palette` (sweeps), sharing the bit
writer :mod:`.bits`. Their tests decode every stream with Pillow and imageio as the reference."""
