"""Text in (DESIGN section 7): the data pipelines, the retrieval tasks, the tokenizers."""
