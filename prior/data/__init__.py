"""Data: the demo corpus, tokenization, WebDataset streaming and weight sidecars."""
