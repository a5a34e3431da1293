"""Distributed runtime pieces: the target<->draft token channel and the remote decoding loop."""
