"""Helpers every layer may use: parser constants, nearest names, finite checks, JSON, atomic writes."""
