"""Tests of the command line (train, merge, convert) and the training library, on tiny models."""
