"""Models: pure position arithmetic (rope.py), the vision encoder, the text decoder and the multimodal model."""
