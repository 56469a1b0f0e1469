"""Loading a model: sources (every input form), the zoo, archive scanning, Hugging Face folders."""
