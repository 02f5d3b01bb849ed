"""Data: registry-package assets (model, corpus), the Brown corpus reader and calibration sets."""
