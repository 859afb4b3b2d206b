"""The Gradio web UI: one module per tab; handlers only map UI values to library calls."""
