"""The runtime around the decoding core: deployment configs, tensor parallelism, and the
target<->draft token channel with the remote decoding loop."""
