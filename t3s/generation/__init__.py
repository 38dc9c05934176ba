"""One interface for generating answers, its engines, and the avg@k statistics.

* `SamplingParams`: how to generate: greedy (``temperature`` 0) or sampled
  (temperature, top-p), ``samples`` answers per prompt, the length bound, stop
  strings, the seed.
* `GenerationEngine`: what generates. ``generate(prompts, params)`` returns, for
  every prompt, ``params.samples`` lists of new token ids; ``sync_weights(model)``
  makes the engine generate with ``model``'s current weights.
* The engines: `HFEngine` (the model's own Hugging Face ``generate``; the default),
  `VLLMEngine` (vLLM colocated in this process, weights synced in memory, asleep
  while training runs; the ``[vllm]`` extra) and `VLLMServerEngine` (a separate
  OpenAI-compatible vLLM server).
* `avg_at_k`: avg@k (the mean over problems of each problem's fraction of correct
  answers), its standard error over problems, and pass@k.

Shapes: a prompt is a list of token ids [T_p]; ``generate`` returns
[n_prompts][samples][T_new_i] (each answer its own length); `avg_at_k` takes
[n_problems][k] booleans.
"""

from .base import GenerationEngine, SamplingParams, avg_at_k
from .hf import HFEngine
from .server import VLLMServerEngine
from .vllm import VLLMEngine, vllm_available

__all__ = ["SamplingParams", "GenerationEngine", "HFEngine", "VLLMEngine", "VLLMServerEngine",
           "avg_at_k", "vllm_available"]
