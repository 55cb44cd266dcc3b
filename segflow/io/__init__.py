"""The edges of segflow: sources, the scene store, label rasterizers and exporters."""
