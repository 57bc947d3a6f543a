"""vllm-cascade: multi-level cascade attention and composable KV chunks for vLLM.

Switch it on with `--attention-backend cascade` (or `attention_backend="cascade"`);
the plugin registers itself through vLLM's entry points.
"""

__version__ = "0.1.0"
BACKEND_NAME = "CASCADE"
