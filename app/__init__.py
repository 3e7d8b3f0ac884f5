"""What users touch: the offline LLM, the CLI, the OpenAI server, the output processor."""
