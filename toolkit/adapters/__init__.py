"""Adapter files: formats (diffusers, kohya/A1111), per-layer factors and updates, verified loading."""
