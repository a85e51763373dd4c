"""Input and output: finding and decoding images (:mod:`.inputs`), writing outputs and the manifest
(:mod:`.outputs`), and the image coders (:mod:`.codecs`)."""
