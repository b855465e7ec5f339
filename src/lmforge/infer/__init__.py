"""Inference: sampling parameters, token selection and generation. Token ids in, token ids out."""
