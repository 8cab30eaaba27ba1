"""Partitions of the pipeline, as module constants (one place to see how the data is cut)."""

from dagster import DynamicPartitionsDefinition

# One partition per batch of text: a file in the text source (inbox). The sensor adds new ones.
ACTIVATION_BATCHES = DynamicPartitionsDefinition(name="activation_batches")
