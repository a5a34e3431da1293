"""mirror-sd: Mirror speculative decoding across heterogeneous devices."""
__version__ = "0.1.0"
