"""Dataset readers and the embedded demo sets."""
