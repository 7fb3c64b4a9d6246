"""Captioning: `core` (a batch of images to captions, and the one place that picks the path), `files` (image files in
bulk), `static` (captune's static-cache loops: the fast path on a GPU)."""
