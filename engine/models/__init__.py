"""Model definitions. Each is a plain ``nn.Module`` that knows nothing of batching
policy or distribution; the runner feeds it a flat batch of tokens."""

from engine.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
