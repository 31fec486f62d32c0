"""Small datasets that ship with the project's dependencies, so everything runs offline."""

from diffquant.data.digits import load_digits

__all__ = ["load_digits"]
