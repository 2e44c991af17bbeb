"""saw-eval: accuracy of saw's KV formats through the OpenAI API (perplexity/KL, HumanEval, GPQA)."""
