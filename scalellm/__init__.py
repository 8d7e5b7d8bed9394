"""ScaleLLM: a resource-frugal LLM serving framework."""

from scalellm.protocol.types import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked for so the gateway stays light.
    if name == "LLM":
        from scalellm.llm import LLM

        return LLM
    raise AttributeError(name)
