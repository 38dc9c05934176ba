"""`VLLMServerEngine`: generation by a separate vLLM server (``vllm serve``), through its
OpenAI-compatible completions endpoint.

The prompts go as token ids and the answers come back as token ids
(``return_token_ids``), so the caller decodes them as it does every engine's. A
server holds its own weights: `VLLMServerEngine.sync_weights` asks it to reload them
from a model directory on a filesystem it shares, through vLLM's development endpoint
``/collective_rpc`` and t3s's worker extension (`SERVER_FLAGS`: the server runs with
``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls
t3s.generation.vllm.VLLMWorkerExtension``, so t3s must be importable there). Pushing a live model's weights from this process needs the colocated
engine (`t3s.generation.VLLMEngine`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .base import GenerationEngine, SamplingParams, prompt_list

__all__ = ["VLLMServerEngine", "SERVER_FLAGS"]

#: how a server must start for `VLLMServerEngine.sync_weights`
SERVER_FLAGS = ("VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                "t3s.generation.vllm.VLLMWorkerExtension")


class VLLMServerEngine(GenerationEngine):
    """Generation by a vLLM server at ``base_url`` (e.g. ``http://127.0.0.1:8000``).

    model: the served model's name (default: the first one ``/v1/models`` lists).
    batch_size: prompts per request (each request asks ``samples`` answers a prompt).
    timeout: seconds to wait for one request.

    The server is asked on construction for its models, so a wrong address fails
    here, with the error, before any work."""

    def __init__(self, base_url: str, *, model: Optional[str] = None, batch_size: int = 64,
                 timeout: float = 600.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) address, got {base_url!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.base_url, self.batch_size, self.timeout = base_url.rstrip("/"), int(batch_size), timeout
        served = [m["id"] for m in self._call("GET", "/v1/models").get("data", [])]
        if not served:
            raise ValueError(f"the vLLM server at {self.base_url} serves no model")
        if model is not None and model not in served:
            raise ValueError(f"the vLLM server at {self.base_url} serves {served}, not {model!r}")
        self.model = model or served[0]

    def _call(self, method: str, route: str, body: Optional[Dict[str, Any]] = None):
        data = None if method == "GET" else json.dumps(body or {}).encode()
        req = urllib.request.Request(self.base_url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"vLLM server {method} {route}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"vLLM server at {self.base_url} ({method} {route}): "
                                  f"{getattr(e, 'reason', e)}") from None
        return json.loads(text) if text.strip() else {}

    def sync_weights(self, model) -> None:
        """Make the server generate with the weights saved in ``model`` (a model
        directory the server can read). The server must run as `SERVER_FLAGS` says;
        a live model is refused (no silent skip)."""
        if not isinstance(model, (str, Path)):
            raise TypeError("a vLLM server cannot take a live model's weights from this "
                            "process; pass a saved model directory, or use the colocated "
                            "engine (t3s.generation.VLLMEngine)")
        path = Path(model).resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json)")
        try:
            self._call("POST", "/collective_rpc",
                       {"method": "t3s_load_weights", "kwargs": {"model_dir": str(path)}})
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nthe server reloads weights through t3s's worker extension: "
                               f"start it with {SERVER_FLAGS}") from None
        self._call("POST", "/reset_prefix_cache")

    def _body(self, prompts: List[List[int]], params: SamplingParams) -> Dict[str, Any]:
        body: Dict[str, Any] = dict(model=self.model, prompt=prompts,
                                    max_tokens=params.max_new_tokens, n=params.samples,
                                    return_token_ids=True, skip_special_tokens=False)
        if params.greedy:
            body["temperature"] = 0.0
        else:
            body.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        if params.stop:
            body.update(stop=list(params.stop), include_stop_str_in_output=True)
        return body

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> List[List[List[int]]]:
        """See `GenerationEngine.generate`. Sampled requests carry ``params.seed``."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = prompt_list(prompts)
        out: List[List[List[int]]] = []
        k = params.samples
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            choices = self._call("POST", "/v1/completions", self._body(chunk, params))["choices"]
            if len(choices) != len(chunk) * k:
                raise RuntimeError(f"the vLLM server returned {len(choices)} answers for "
                                   f"{len(chunk)} prompts, {k} each")
            rows: List[Optional[List[int]]] = [None] * len(choices)
            for c in choices:
                if c.get("token_ids") is None:
                    raise RuntimeError("the vLLM server returned no token ids (it needs "
                                       "return_token_ids support, vLLM >= 0.10.2)")
                rows[int(c["index"])] = [int(t) for t in c["token_ids"]]
            out.extend(rows[i * k:(i + 1) * k] for i in range(len(chunk)))
        return out
