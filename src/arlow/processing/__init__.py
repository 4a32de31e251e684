"""Processors: pixels to patch rows, image/video processors, media loading, tokenizer, chat template."""
