"""Bridges to other libraries' training and saving machinery (imported lazily by them)."""
