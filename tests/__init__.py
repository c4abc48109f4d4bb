"""The test suite, laid out as `src/loracast/` is (ARCHITECTURE.md, "Tests")."""
