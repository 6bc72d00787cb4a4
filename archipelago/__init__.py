"""Archipelago: decentralized diffusion training (compute islands, router, ensemble) and distributed
inference. See docs/architecture.md for the map."""
__version__ = "0.1.0"
