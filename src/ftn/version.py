"""The package version, in a leaf module so every module can read it without the package hub."""

__version__ = "0.1.0"
