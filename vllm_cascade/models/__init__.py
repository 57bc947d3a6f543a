"""Model classes the plugin registers with vLLM's model registry."""
