"""Weights in and out of other frameworks: OpenCLIP / OpenAI CLIP (``openclip``)."""
