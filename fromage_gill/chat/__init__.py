"""The chat app's logic without gradio: sessions, the model gate, messages, labels, export and import."""
