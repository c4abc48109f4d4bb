"""The package version, in one place (read by the CLI, the fingerprint and the train report)."""

__version__ = "0.1.0"
