"""Datasets: the embedded multi-domain benchmark and real-world folder layouts."""
