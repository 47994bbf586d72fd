"""muse: O(N) long-context language models and the harness that measures them."""

__version__ = "0.1.0"
