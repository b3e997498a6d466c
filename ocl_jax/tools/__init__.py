"""Command-line tools outside the library: the benchmark, its PyTorch reference, contact sheets.

Nothing in the library imports from here."""
