"""modlens: is this trained network modular, and which groups of its neurons are the modules?"""

__version__ = "0.1.0"
