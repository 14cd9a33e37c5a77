"""The recipes: scripts that reproduce the results in docs/RESULTS.md (not part of the installed package)."""
