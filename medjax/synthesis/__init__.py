"""Data synthesis: multi-hop QA from the knowledge graph (`qa`)."""
