"""The drpo command line (``drpo --help``)."""
