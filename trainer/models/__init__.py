"""Base models that are not plain Hugging Face directories: packaged GGUF files and their conversion."""
