"""MegaContext JAX: a language model reading a fixed-size working context of tokens and gists."""

__version__ = "0.1.0"
