"""Faithfulness metrics over explanation maps: pure, batched tensor functions (no files, no images on disk)."""
