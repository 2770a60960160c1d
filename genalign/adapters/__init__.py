"""Modality adapters: batches -> per-sample policy/reference scores on shared randomness."""
