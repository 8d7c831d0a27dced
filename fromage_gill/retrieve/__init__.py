"""Retrieval: the image index (storage, exact and FAISS search, building, the published embeddings), bounded
URL fetching and the readers of image sets."""
