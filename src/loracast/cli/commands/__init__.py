"""Sub-commands of the `loracast` command line, one module each (found by discovery in `loracast.cli`)."""
