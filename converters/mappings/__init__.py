"""Keras layer -> timm parameter mappings, one module per architecture family.

Each module exposes ``to_timm(layers, include_top) -> state_dict`` where ``layers``
maps Keras layer names (as a fresh Keras 3 session names them, see ``manifest``)
to ``{weight role: array}``.
"""
