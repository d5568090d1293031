"""Offline medical knowledge: ontologies, knowledge graphs and retrieval."""
