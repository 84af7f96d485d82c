"""Hub push with the real ``huggingface_hub.HfApi`` against a loopback fake Hub (no network)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trl_video import cli
from trl_video.errors import TrlVideoError

TOKEN = "hf_test_token_123"
EXPECTED_FILES = ("model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                  "pytorch_lora_weights.safetensors", "README.md")


# ------------------------------------------------------------------------------------------------ fake hub
@dataclass
class FakeHub:
    """What the fake Hub saw: requests (method, path, authorization header) and the files committed per repo."""

    storage: Path
    port: int = 0
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    commits: dict[str, list[str]] = field(default_factory=dict)
    reject_token: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo_dir(self, repo_id: str) -> Path:
        return self.storage / repo_id


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
            pass

        def _send(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _record(self) -> bool:
            auth = self.headers.get("Authorization", "")
            with hub.lock:
                hub.requests.append((self.command, self.path, auth))
            if hub.reject_token:
                self._body()
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if not self._record():
                return
            with hub.lock:
                hub.unexpected.append(f"GET {self.path}")
            self._send(404, {"error": f"fake hub: no GET {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            if not self._record():
                return
            path = self.path.split("?")[0]
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}"
                with hub.lock:
                    hub.repos[repo_id] = req
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            elif path == "/api/validate-yaml":
                self._send(200, {"errors": [], "warnings": []})
            elif path.startswith("/api/models/") and path.endswith("/preupload/main"):
                files = json.loads(body)["files"]
                self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                            "oid": None} for f in files]})
            elif path.startswith("/api/models/") and path.endswith("/commit/main"):
                repo_id = path[len("/api/models/"):-len("/commit/main")]
                if repo_id not in hub.repos:
                    self._send(404, {"error": f"Repository {repo_id} not found"})
                    return
                written = []
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        assert value["encoding"] == "base64"
                        dest = hub.repo_dir(repo_id) / value["path"]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(base64.b64decode(value["content"]))
                        written.append(value["path"])
                    elif item["key"] != "header":
                        with hub.lock:
                            hub.unexpected.append(f"commit op {item['key']}")
                with hub.lock:
                    hub.commits.setdefault(repo_id, []).extend(written)
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                 "pullRequestUrl": None})
            else:
                with hub.lock:
                    hub.unexpected.append(f"POST {path}")
                self._send(404, {"error": f"fake hub: no POST {path}"})

    return Handler


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub(storage=tmp_path / "hub_storage")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------ trained model
@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One LoRA ReFL step on tiny-wan-random, with the final diffusers folder written to out/model."""
    import datasets

    from trl_video import VideoRewardTrainer
    from trl_video.config import config_from_dict

    run = tmp_path_factory.mktemp("hub_run")
    # a latent-space reward (dotted path) skips the VAE decode: the step stays cheap on a shared CPU
    (run / "trlv_hub_rewards.py").write_text(
        "def latent_energy(inputs, prompts):\n"
        "    return -(inputs.float() ** 2).flatten(1).mean(1)\n\n\n"
        "latent_energy.space = 'latent'\nlatent_energy.differentiable = True\n")
    out = run / "out"
    config = config_from_dict({
        "model": "tiny-wan-random", "method": "refl", "reward": "trlv_hub_rewards:latent_energy",
        "sampler_args": {"num_steps": 2, "grad_steps": 1}, "prompts_per_step": 2, "group_size": 1,
        "max_steps": 1, "report_to": "none", "use_peft": True, "lora_r": 4, "output_dir": str(out),
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(run))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        tr = VideoRewardTrainer(config)
        tr.train()
    assert (out / "model" / "model_index.json").exists()
    return tr


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
        assert TOKEN[3:] not in text  # not even without the "hf_" prefix


# ------------------------------------------------------------------------------------------------ tests
def test_trainer_push_to_fake_hub(trainer: Any, fake_hub: FakeHub, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = trainer.push_to_hub(repo_id="user/tiny", endpoint=fake_hub.url, token=TOKEN)
    assert url == f"{fake_hub.url}/user/tiny"
    assert fake_hub.unexpected == []
    assert fake_hub.repos["user/tiny"]["type"] == "model"
    # the token was sent to the hub (and only there)
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)
    paths = [p.split("?")[0] for _, p, _ in fake_hub.requests]
    assert "/api/repos/create" in paths and "/api/models/user/tiny/commit/main" in paths

    stored = fake_hub.repo_dir("user/tiny")
    received = set(fake_hub.commits["user/tiny"])
    for name in EXPECTED_FILES:
        assert name in received, f"{name} not uploaded; got {sorted(received)}"
    # every file of the local model folder arrived byte-identical
    local = _files(trainer.output_dir / "model")
    assert _files(stored) == local

    # the folder rebuilt from what the hub stored is a loadable diffusers pipeline
    from diffusers import DiffusionPipeline, WanPipeline

    rebuilt = tmp_path / "rebuilt"
    for rel, data in _files(stored).items():
        (rebuilt / rel).parent.mkdir(parents=True, exist_ok=True)
        (rebuilt / rel).write_bytes(data)
    pipe = DiffusionPipeline.from_pretrained(str(rebuilt))
    assert isinstance(pipe, WanPipeline)
    assert pipe.transformer is not None and pipe.vae is not None

    card = (stored / "README.md").read_text()
    assert "tiny-wan-random" in card
    assert "@article{prabhudesai2024vader" in card  # the method's citation (MethodSpec.citation)
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-video" in card
    # TRL's generate_model_card layout: its tags, "trained with <method>, a method introduced in <paper>", the
    # framework versions and TRL's own citation; the quick start is a diffusers pipeline
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert {"trl", "trl-video", "trl-video-refl", "generated_from_trainer"} <= set(data.tags)
    assert ("This model was trained with refl, a method introduced in [Video Diffusion Alignment via Reward "
            "Gradients](https://huggingface.co/papers/2407.08737)") in card
    assert "### Framework versions" in card and "- TRL: " in card and "- diffusers: " in card
    assert "Cite TRL as" in card and "DiffusionPipeline.from_pretrained(\"user/tiny\")" in card
    assert "text-generation" not in card  # TRL's language-model quick start was replaced

    cap = capsys.readouterr()
    _assert_no_token(cap.out, cap.err, caplog.text, card)


def test_cli_push_uses_hf_token_env(trainer: Any, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = cli.main(["push", "--checkpoint", str(trainer.output_dir), "--repo-id", "user/x",
                     "--endpoint", fake_hub.url])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert cap.out.strip() == f"pushed to {fake_hub.url}/user/x"
    assert fake_hub.unexpected == []
    assert fake_hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)
    assert set(EXPECTED_FILES) <= set(fake_hub.commits["user/x"])
    assert _files(fake_hub.repo_dir("user/x")) == _files(trainer.output_dir / "model")
    _assert_no_token(cap.out, cap.err, caplog.text)


def test_rejected_token_is_one_line_without_the_token(trainer: Any, fake_hub: FakeHub,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_hub.reject_token = True
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = cli.main(["push", "--checkpoint", str(trainer.output_dir), "--repo-id", "user/x",
                     "--endpoint", fake_hub.url])
    cap = capsys.readouterr()
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: push to 'user/x' failed"), cap.err
    assert "Traceback" not in cap.err
    assert not fake_hub.commits
    _assert_no_token(cap.out, cap.err, caplog.text)


def test_unreachable_endpoint_is_one_line_trl_video_error(trainer: Any, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrlVideoError) as exc:
        trainer.push_to_hub(repo_id="user/tiny", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("push to 'user/tiny' failed")
    cap = capsys.readouterr()
    _assert_no_token(msg, cap.out, cap.err, caplog.text)


def test_push_needs_a_repo_id(trainer: Any) -> None:
    with pytest.raises(TrlVideoError, match="hub_model_id"):
        trainer.push_to_hub()


def test_push_records_eval_metrics_in_the_model_index(trainer: Any, fake_hub: FakeHub,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`trl-video eval`'s evaluate modules -> eval_results.json (evaluate.save) -> `trl-video push` writes them as
    the card's model-index, which the fake Hub receives."""
    from huggingface_hub import ModelCard

    from trl_video.evaluation import eval_pairs, evaluate

    prompts, seeds = eval_pairs("world:heldout", 4)
    res = evaluate(trainer.policy, prompts, seeds, {"luminance": trainer.registry.create("reward", "luminance")},
                   trainer.output_dir / "eval", num_steps=2, prompts_source="world:heldout")
    saved = json.loads((trainer.output_dir / "eval" / "eval_results.json").read_text())
    assert saved["gain"] == res["gain"] and "_evaluate_version" in saved
    assert set(saved["metrics"]["frechet_distance"]) == {"after_vs_before", "before_vs_world", "after_vs_world"}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = cli.main(["push", "--checkpoint", str(trainer.output_dir), "--repo-id", "user/evald",
                     "--endpoint", fake_hub.url])
    assert code == 0, capsys.readouterr().err
    card = ModelCard((fake_hub.repo_dir("user/evald") / "README.md").read_text())
    (entry,) = card.data.to_dict()["model-index"]
    values = {(m["type"], m.get("config")): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert values[("reward_gain", "luminance")] == pytest.approx(res["gain"], abs=1e-6)
    assert values[("reward_gain_sem", "luminance")] == pytest.approx(res["gain_sem"], abs=1e-6)
    fd = saved["metrics"]["frechet_distance"]["after_vs_world"]
    assert values[("frechet_distance", "after_vs_world")] == pytest.approx(fd, abs=1e-6)
    assert entry["results"][0]["dataset"]["type"] == "world:heldout"
