"""The reward service: any registered reward over HTTP (starlette app served by uvicorn), and its client.

Server (``trl-video reward-serve --reward NAME --port P``):
    GET  /info   -> {"name", "space", "max_batch"}
    POST /score  <- safetensors bytes: tensor "inputs" [B, C, F, H, W] (pixels in [-1, 1], or latents),
                    metadata {"prompts": JSON list}
                 -> safetensors bytes: tensor "rewards" [B] (float32; NaN passes through, the client checks)
One request is scored at a time (a reward model is not re-entrant); scoring runs in a worker thread so the
event loop keeps accepting connections.

Client (``reward: http://127.0.0.1:P`` in a recipe): :class:`HttpReward`, non-differentiable. It sends batches
of at most ``batch_size`` samples, with a per-request ``timeout`` and ``retries`` (exponential backoff) on
connection errors, timeouts and 5xx answers; every failure is one ``TrlVideoError`` line naming the URL.
Overlapping the remote scoring with sampling is the trainer's job (``score_async``).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from typing import Any

import torch
from torch import Tensor

from trl_video.errors import TrlVideoError

from .deps import require


# ------------------------------------------------------------------------------------------------ wire format
def pack(tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)


def unpack(body: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors bytes -> (tensors, metadata); raises ValueError on anything malformed."""
    from safetensors.torch import load

    if len(body) < 8:
        raise ValueError("body is not safetensors data")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise ValueError("body is not safetensors data")
    meta = json.loads(body[8:8 + n]).get("__metadata__") or {}
    return load(body), meta


# ------------------------------------------------------------------------------------------------ server
def build_app(reward: Any, max_batch: int = 16) -> Any:
    """A starlette app serving ``reward`` (any registered reward object)."""
    require("starlette", "serve", "the reward service")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    lock = threading.Lock()
    name = getattr(reward, "name", type(reward).__name__)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"name": name, "space": getattr(reward, "space", "pixel"), "max_batch": max_batch})

    def _score(inputs: Tensor, prompts: list[str]) -> Tensor:
        with lock, torch.no_grad():
            return torch.as_tensor(reward(inputs, prompts)).float().flatten().cpu()

    async def score(request: Request) -> Response:
        try:
            tensors, meta = unpack(await request.body())
            inputs = tensors["inputs"].float()
            prompts = json.loads(meta.get("prompts", "[]"))
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        if inputs.shape[0] != len(prompts):
            return JSONResponse({"error": f"{inputs.shape[0]} inputs but {len(prompts)} prompts"}, status_code=400)
        if inputs.shape[0] > max_batch:
            return JSONResponse({"error": f"batch {inputs.shape[0]} > max_batch {max_batch}"}, status_code=413)
        try:
            rewards = await run_in_threadpool(_score, inputs, prompts)
        except Exception as exc:  # the reward failed: tell the client in one line
            return JSONResponse({"error": f"reward '{name}' failed: {type(exc).__name__}: {exc}"}, status_code=500)
        return Response(pack({"rewards": rewards}), media_type="application/octet-stream")

    return Starlette(routes=[Route("/info", info), Route("/score", score, methods=["POST"])])


class BackgroundServer:
    """uvicorn serving an app from a thread (tests, benchmarks); ``port=0`` picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        uvicorn = require("uvicorn", "serve", "the reward service")
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error", lifespan="off"))
        self.host, self.port = host, port
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError("reward server did not start")
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(reward_name: str, reward_args: dict[str, Any], host: str, port: int, max_batch: int) -> None:
    """``trl-video reward-serve``: build the reward from the registry and serve it until interrupted."""
    uvicorn = require("uvicorn", "serve", "the reward service")
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    reward = build_reward(get_registry(), reward_name, reward_args)
    app = build_app(reward, max_batch=max_batch)
    print(f"serving reward '{reward_name}' ({getattr(reward, 'space', 'pixel')}) on http://{host}:{port}  "
          f"(POST /score, GET /info)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


# ------------------------------------------------------------------------------------------------ client
class HttpReward:
    """A reward scored by a remote ``trl-video reward-serve`` (non-differentiable)."""

    differentiable = False

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, batch_size: int | None = None,
                 backoff: float = 0.5, connect_timeout: float = 5.0):
        httpx = require("httpx", "serve", "the HTTP reward")
        self.url = url.rstrip("/")
        self.name = self.url
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._httpx = httpx
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=connect_timeout))
        info = self._request("GET", "/info").json()
        self.space = info.get("space", "pixel")
        self.remote_name = info.get("name", "?")
        self.batch_size = int(batch_size or info.get("max_batch") or 16)

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        httpx = self._httpx
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.client.request(method, self.url + path, content=body)
            except httpx.TimeoutException:
                reason = f"no answer within {self.timeout:g}s (timeout)"
                continue
            except httpx.TransportError as exc:
                reason = f"cannot connect ({type(exc).__name__}); is `trl-video reward-serve` running?"
                continue
            if resp.status_code >= 500:
                reason = f"server error {resp.status_code}: {_error_text(resp)}"
                continue
            if resp.status_code >= 400:  # our request is wrong: retrying does not help
                raise TrlVideoError(f"reward server {self.url}: {resp.status_code} {_error_text(resp)}")
            return resp
        raise TrlVideoError(f"reward server {self.url}: {reason} (after {self.retries + 1} attempts)")

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk, ps = inputs[lo:lo + self.batch_size], prompts[lo:lo + self.batch_size]
            body = pack({"inputs": chunk.detach().to(torch.float16)}, {"prompts": json.dumps(ps)})
            resp = self._request("POST", "/score", body)
            try:
                r = unpack(resp.content)[0]["rewards"]
            except (ValueError, KeyError) as exc:
                raise TrlVideoError(f"reward server {self.url}: answer is not a rewards tensor ({exc})") from None
            if tuple(r.shape) != (len(ps),):
                raise TrlVideoError(f"reward server {self.url}: returned shape {tuple(r.shape)} for {len(ps)} "
                                    f"samples (expected ({len(ps)},))")
            if not torch.isfinite(r).all():
                bad = [lo + i for i in (~torch.isfinite(r)).nonzero().flatten().tolist()]
                raise TrlVideoError(f"reward server {self.url}: returned NaN/inf for samples {bad[:8]}")
            out.append(r)
        return torch.cat(out).to(inputs.device)

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def _error_text(resp: Any) -> str:
    try:
        return str(resp.json().get("error", ""))[:200]
    except Exception:
        return resp.text[:200].replace("\n", " ")
