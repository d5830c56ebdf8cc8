"""Backbones and the heads built on them."""
