"""Input side: sources, records, tokenizers, converters, synthetic data, grain pipeline."""
