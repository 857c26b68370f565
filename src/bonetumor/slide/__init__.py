"""Whole slides: tiling at the training scale, percent necrosis with its interval, the map and QuPath exports."""
