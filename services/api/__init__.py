"""Warlock API service. For now: the `warlock` dev launcher and the file-backed token authority."""

__version__ = "0.1.0"
