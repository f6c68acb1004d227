"""Zero-shot classification and retrieval evaluation."""
