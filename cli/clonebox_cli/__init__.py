"""CloneBox command-line interface."""
