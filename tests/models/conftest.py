"""The SmolLM2-135M session fixtures (smollm2, smollm2_tokenizer, smollm2_torch,
sotu_eval_tokens) live in tests/conftest.py: tests/pipeline uses them too."""
