"""tripletctl: triplet-loss embedding training from YAML curricula."""

__version__ = "0.1.0"
