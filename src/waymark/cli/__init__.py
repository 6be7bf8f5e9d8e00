"""The ``waymark`` command line (Typer + Rich)."""
