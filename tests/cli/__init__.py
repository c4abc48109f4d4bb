"""Tests of the command line (`loracast.cli`: arguments, one-line errors, merge, convert, the GGUF path), on
tiny models; the training application's own tests are in tests/training/."""
