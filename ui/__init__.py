"""Helpers of the Gradio app (``app.py``): uploads, store actions with JSON-friendly results."""
