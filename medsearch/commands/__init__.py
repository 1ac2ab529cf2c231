"""Command groups of the CLI, one module each."""
